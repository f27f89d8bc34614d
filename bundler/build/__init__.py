"""Stage 1, what the board runs on: its cross toolchain, the TVM runtime for it (wheel or source
build) and the C++ deploy harness ``tvm-deploy``."""
