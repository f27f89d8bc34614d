"""Stage 2, the model: ONNX prepared for TVM, compiled with Relax for the board with default
schedules or tuned ones, and the selftest vectors."""
