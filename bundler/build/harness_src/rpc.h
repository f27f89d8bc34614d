// `tvm-deploy rpc`: a TVM RPC server built from the very runtime the bundle ships, so that
// MetaSchedule can measure candidate kernels on the board (tvmbundle tune).
#ifndef TVMBUNDLE_RPC_H_
#define TVMBUNDLE_RPC_H_

#include <string>
#include <vector>

namespace tvmbundle {

// Runs the server until killed (or after --sessions N sessions). Needs no bundle: only the
// runtime libraries next to the program. Throws std::invalid_argument on a bad argument.
int RpcServe(const std::vector<std::string>& args);

}  // namespace tvmbundle

#endif  // TVMBUNDLE_RPC_H_
