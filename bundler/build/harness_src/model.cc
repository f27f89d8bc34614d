#include "model.h"

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/string.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace tvmbundle {
namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

namespace {

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    // 64-byte alignment: what TVM's kernels assume for vector loads.
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (!t->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RuntimeFailure(path + ": cannot open (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

class JsonReader {
 public:
  JsonReader(std::string file) : file_(std::move(file)) {}
  json::Object Obj(const ffi::Any& v, const std::string& key) const {
    if (auto o = v.try_cast<json::Object>()) return *o;
    throw Bad(key, "an object");
  }
  ffi::Any Get(const json::Object& o, const std::string& key, const std::string& path) const {
    auto it = o.find(ffi::String(key));
    if (it == o.end()) throw RuntimeFailure(file_ + ": missing key " + path);
    return (*it).second;
  }
  std::string Str(const json::Object& o, const std::string& key, const std::string& path) const {
    ffi::Any v = Get(o, key, path);
    if (auto s = v.try_cast<ffi::String>()) return std::string(*s);
    throw Bad(path, "a string");
  }
  std::string StrOr(const json::Object& o, const std::string& key, const std::string& fallback) const {
    auto it = o.find(ffi::String(key));
    if (it == o.end()) return fallback;
    if (auto s = (*it).second.try_cast<ffi::String>()) return std::string(*s);
    return fallback;
  }
  double Num(const json::Object& o, const std::string& key, const std::string& path) const {
    ffi::Any v = Get(o, key, path);
    if (auto d = v.try_cast<double>()) return *d;
    if (auto i = v.try_cast<int64_t>()) return double(*i);
    throw Bad(path, "a number");
  }
  json::Array Arr(const json::Object& o, const std::string& key, const std::string& path) const {
    ffi::Any v = Get(o, key, path);
    if (auto a = v.try_cast<json::Array>()) return *a;
    throw Bad(path, "an array");
  }
  RuntimeFailure Bad(const std::string& path, const std::string& want) const {
    return RuntimeFailure(file_ + ": " + path + " is not " + want);
  }

 private:
  std::string file_;
};

std::vector<TensorSpec> ReadSpecs(const JsonReader& r, const json::Array& arr, const std::string& path) {
  std::vector<TensorSpec> out;
  for (size_t i = 0; i < arr.size(); ++i) {
    std::string p = path + "[" + std::to_string(i) + "]";
    json::Object o = r.Obj(arr[i], p);
    TensorSpec s;
    s.name = r.Str(o, "name", p + ".name");
    s.dtype_name = r.Str(o, "dtype", p + ".dtype");
    if (!DTypeFromName(s.dtype_name, &s.dtype)) throw RuntimeFailure("manifest.json: " + p + ": unsupported dtype " + s.dtype_name);
    for (const ffi::Any& d : r.Arr(o, "shape", p + ".shape")) {
      auto v = d.try_cast<int64_t>();
      if (!v || *v < 0) throw r.Bad(p + ".shape", "an array of non-negative integers");
      s.shape.push_back(*v);
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::string> ReadStrings(const JsonReader& r, const json::Array& arr, const std::string& path) {
  std::vector<std::string> out;
  for (const ffi::Any& v : arr) {
    auto s = v.try_cast<ffi::String>();
    if (!s) throw r.Bad(path, "an array of strings");
    out.emplace_back(*s);
  }
  return out;
}

}  // namespace

size_t TensorSpec::Bytes() const {
  size_t n = dtype.bits / 8;
  for (int64_t d : shape) n *= size_t(d);
  return n;
}

Bundle Bundle::Load(const std::string& root) {
  Bundle b;
  b.root = root;
  std::string file = root + "/manifest.json";
  b.manifest_json = ReadFile(file);
  ffi::String err;
  json::Value doc = json::Parse(b.manifest_json, &err);
  if (!err.empty()) throw RuntimeFailure(file + ": not valid JSON: " + std::string(err));
  JsonReader r(file);
  json::Object m = r.Obj(doc, "(top)");
  b.bundle_id = r.Str(m, "bundle_id", "bundle_id");
  b.name = r.StrOr(m, "name", "model");
  json::Object board = r.Obj(r.Get(m, "board", "board"), "board");
  b.board = r.Str(board, "name", "board.name");
  json::Object compiler = r.Obj(r.Get(m, "compiler", "compiler"), "compiler");
  b.compiler_tvm = r.StrOr(compiler, "apache-tvm", "?");
  b.compiler_ffi = r.StrOr(compiler, "apache-tvm-ffi", "?");
  json::Object runtime = r.Obj(r.Get(m, "runtime", "runtime"), "runtime");
  b.runtime_origin = r.StrOr(runtime, "origin", "?");
  b.runtime_tvm = r.StrOr(runtime, "apache-tvm", "?");
  b.runtime_ffi = r.StrOr(runtime, "apache-tvm-ffi", "?");
  b.runtime_platform = r.StrOr(runtime, "platform", "");
  json::Object model = r.Obj(r.Get(m, "model", "model"), "model");
  b.model_file = r.Str(model, "file", "model.file");
  b.inputs = ReadSpecs(r, r.Arr(model, "inputs", "model.inputs"), "model.inputs");
  b.outputs = ReadSpecs(r, r.Arr(model, "outputs", "model.outputs"), "model.outputs");
  json::Object st = r.Obj(r.Get(m, "selftest", "selftest"), "selftest");
  b.selftest_inputs = ReadStrings(r, r.Arr(st, "inputs", "selftest.inputs"), "selftest.inputs");
  b.selftest_expected = ReadStrings(r, r.Arr(st, "expected", "selftest.expected"), "selftest.expected");
  b.rtol = r.Num(st, "rtol", "selftest.rtol");
  b.atol = r.Num(st, "atol", "selftest.atol");
  auto svc = m.find(ffi::String("service"));
  if (svc != m.end()) {
    if (auto o = (*svc).second.try_cast<json::Object>()) b.listen = r.StrOr(*o, "listen", "");
  }
  return b;
}

Model::Model(const Bundle& bundle) : bundle_(bundle) {
  std::string path = bundle.Path(bundle.model_file);
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe) throw RuntimeFailure(path + ": cannot open (" + std::strerror(errno) + ")");
  }
  try {
    // A path with a slash: dlopen must not search the library path for it.
    ffi::Module lib = ffi::Module::LoadFromFile(path);
    auto load = lib->GetFunction("vm_load_executable");
    if (!load) throw RuntimeFailure(path + ": not a TVM Relax executable (no vm_load_executable)");
    ffi::Module vm = (*load)().cast<ffi::Module>();
    auto init = vm->GetFunction("vm_initialization");
    if (!init) throw RuntimeFailure(path + ": the Relax VM has no vm_initialization");
    // CPU device 0 with the pooled allocator, which reuses buffers across calls.
    (*init)(static_cast<int>(kDLCPU), 0, 2);
    auto main = vm->GetFunction("main");
    if (!main) throw RuntimeFailure(path + ": the model has no 'main' function");
    main_ = *main;
  } catch (const RuntimeFailure&) {
    throw;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg.size() > 600) msg = msg.substr(0, 600) + "...";
    throw RuntimeFailure(path + ": cannot load the model: " + msg);
  }
}

std::vector<ffi::Tensor> Model::MakeInputs(const std::vector<NpyArray>& arrays) const {
  const auto& specs = bundle_.inputs;
  if (arrays.size() != specs.size()) {
    throw InputError("the model takes " + std::to_string(specs.size()) + " input(s), got " +
                     std::to_string(arrays.size()));
  }
  std::vector<ffi::Tensor> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const NpyArray& a = arrays[i];
    if (DTypeName(a.dtype) != s.dtype_name) {
      throw InputError("input '" + s.name + "': dtype " + DTypeName(a.dtype) + " does not match the model's " +
                       s.dtype_name);
    }
    if (a.shape != s.shape) {
      throw InputError("input '" + s.name + "': shape " + ShapeString(a.shape) + " does not match the model's " +
                       ShapeString(s.shape));
    }
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(s.shape), s.dtype, DLDevice{kDLCPU, 0});
    std::memcpy(t.data_ptr(), a.data.data(), a.data.size());
    out.push_back(std::move(t));
  }
  return out;
}

ffi::Any Model::Invoke(const std::vector<ffi::Tensor>& inputs) {
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  std::lock_guard<std::mutex> lock(mu_);
  try {
    main_.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  } catch (const std::exception& e) {
    throw RuntimeFailure(std::string("inference failed: ") + e.what());
  }
  return result;
}

std::vector<NpyArray> Model::Outputs(const ffi::Any& result) const {
  std::vector<ffi::Tensor> tensors;
  if (auto t = result.try_cast<ffi::Tensor>()) {
    tensors.push_back(*t);
  } else if (auto arr = result.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *arr) {
      auto t2 = v.try_cast<ffi::Tensor>();
      if (!t2) throw RuntimeFailure("the model returned a non-tensor output");
      tensors.push_back(*t2);
    }
  } else {
    throw RuntimeFailure("the model returned neither a tensor nor a tuple of tensors");
  }
  if (tensors.size() != bundle_.outputs.size()) {
    throw RuntimeFailure("the model returned " + std::to_string(tensors.size()) + " output(s), the manifest lists " +
                         std::to_string(bundle_.outputs.size()));
  }
  std::vector<NpyArray> out;
  for (const ffi::Tensor& t : tensors) {
    NpyArray a;
    a.dtype = t.dtype();
    if (a.dtype.code == kDLUInt && a.dtype.bits == 1) a.dtype = DLDataType{kDLBool, 8, 1};
    for (int64_t d : t.shape()) a.shape.push_back(d);
    size_t n = ffi::GetDataSize(t);
    const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr()) + t.byte_offset();
    a.data.assign(p, p + n);
    out.push_back(std::move(a));
  }
  return out;
}

std::vector<NpyArray> Model::Run(const std::vector<NpyArray>& arrays) {
  return Outputs(Invoke(MakeInputs(arrays)));
}

int RuntimeThreads() {
  auto f = ffi::Function::GetGlobal("runtime.NumThreads");
  if (!f) return -1;
  try {
    return (*f)().cast<int>();
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace tvmbundle
