// A bundle on disk (its manifest) and the model in it, loaded into TVM's Relax VM.
#ifndef TVMBUNDLE_MODEL_H_
#define TVMBUNDLE_MODEL_H_

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.h"

namespace tvmbundle {

// The model or the bundle itself is broken (not the user's data): exit code 3, HTTP 500.
class RuntimeFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TensorSpec {
  std::string name;
  std::string dtype_name;
  DLDataType dtype{kDLFloat, 32, 1};
  std::vector<int64_t> shape;
  size_t Bytes() const;
};

struct Bundle {
  std::string root;
  std::string manifest_json;
  std::string bundle_id, name, board, model_file;
  std::string compiler_tvm, compiler_ffi, runtime_origin, runtime_tvm, runtime_ffi, runtime_platform;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<std::string> selftest_inputs, selftest_expected;
  double rtol = 1e-3, atol = 1e-4;
  std::string listen;  // service.listen, the default address of `serve`

  static Bundle Load(const std::string& root);
  std::string Path(const std::string& rel) const { return root + "/" + rel; }
};

class Model {
 public:
  explicit Model(const Bundle& bundle);

  // Checks count, dtype and shape of every input against the signature; throws InputError.
  std::vector<tvm::ffi::Tensor> MakeInputs(const std::vector<NpyArray>& arrays) const;
  // One inference. The Relax VM keeps per-call state, so calls are serialized.
  tvm::ffi::Any Invoke(const std::vector<tvm::ffi::Tensor>& inputs);
  std::vector<NpyArray> Outputs(const tvm::ffi::Any& result) const;
  std::vector<NpyArray> Run(const std::vector<NpyArray>& arrays);

  const Bundle& bundle() const { return bundle_; }

 private:
  const Bundle& bundle_;
  tvm::ffi::Function main_;
  std::mutex mu_;
};

int RuntimeThreads();  // the size of TVM's thread pool, as the runtime reports it

}  // namespace tvmbundle

#endif  // TVMBUNDLE_MODEL_H_
