#include "v2.h"

#include <cstring>
#include <limits>

#include "json.h"

namespace tvmbundle {
namespace v2 {
namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? "," : "") + std::to_string(shape[k]);
  return s + "]";
}

std::string Names(const std::vector<TensorSpec>& specs) {
  std::string s;
  for (const auto& t : specs) s += (s.empty() ? "" : ", ") + t.name;
  return s;
}

// Stores one JSON element as the tensor's type at dst; false when it does not fit the type.
using Store = bool (*)(const json::Value& v, uint8_t* dst);

template <typename T>
bool StoreFloat(const json::Value& v, uint8_t* dst) {
  if (!v.IsNumber()) return false;
  T x = static_cast<T>(v.number);
  std::memcpy(dst, &x, sizeof(T));
  return true;
}

bool StoreHalf(const json::Value& v, uint8_t* dst) {
  if (!v.IsNumber()) return false;
  uint16_t h = FloatToHalf(static_cast<float>(v.number));
  std::memcpy(dst, &h, 2);
  return true;
}

template <typename T>
bool StoreInt(const json::Value& v, uint8_t* dst) {
  if (!v.IsNumber() || !v.integral) return false;
  T x;
  if (v.negative) {
    if (!std::numeric_limits<T>::is_signed || v.i < int64_t(std::numeric_limits<T>::min())) return false;
    x = static_cast<T>(v.i);
  } else {
    if (v.u > uint64_t(std::numeric_limits<T>::max())) return false;
    x = static_cast<T>(v.u);
  }
  std::memcpy(dst, &x, sizeof(T));
  return true;
}

bool StoreBool(const json::Value& v, uint8_t* dst) {
  if (!v.IsBool()) return false;
  *dst = v.boolean ? 1 : 0;
  return true;
}

Store StoreFor(DLDataType t) {
  switch (t.code) {
    case kDLFloat:
      if (t.bits == 16) return StoreHalf;
      if (t.bits == 32) return StoreFloat<float>;
      if (t.bits == 64) return StoreFloat<double>;
      break;
    case kDLInt:
      if (t.bits == 8) return StoreInt<int8_t>;
      if (t.bits == 16) return StoreInt<int16_t>;
      if (t.bits == 32) return StoreInt<int32_t>;
      if (t.bits == 64) return StoreInt<int64_t>;
      break;
    case kDLUInt:
      if (t.bits == 8) return StoreInt<uint8_t>;
      if (t.bits == 16) return StoreInt<uint16_t>;
      if (t.bits == 32) return StoreInt<uint32_t>;
      if (t.bits == 64) return StoreInt<uint64_t>;
      break;
    case kDLBool:
      return StoreBool;
  }
  return nullptr;
}

const char* Expected(DLDataType t) {
  if (t.code == kDLBool) return "true or false";
  if (t.code == kDLFloat) return "a number";
  return "an integer in the datatype's range";
}

// Row-major elements of a possibly nested data array, written to `dst`.
struct Filler {
  Store store;
  uint8_t* dst;
  size_t elem_size;
  size_t want;
  size_t count = 0;
  const json::Value* bad = nullptr;

  bool Walk(const json::Value& v) {
    if (v.IsArray()) {
      for (const json::Value& e : v.items) {
        if (!Walk(e)) return false;
      }
      return true;
    }
    if (count >= want) {  // counted on, not stored: the error names the real count
      ++count;
      return true;
    }
    if (!store(v, dst + count * elem_size)) {
      bad = &v;
      return false;
    }
    ++count;
    return true;
  }
};

bool GetBool(const json::Value* params, std::string_view key, bool fallback, const std::string& where) {
  if (!params) return fallback;
  const json::Value* v = params->Find(key);
  if (!v) return fallback;
  if (!v->IsBool()) throw InputError(where + ": parameter '" + std::string(key) + "' must be true or false");
  return v->boolean;
}

const json::Value* Params(const json::Value& obj, const std::string& where) {
  const json::Value* p = obj.Find("parameters");
  if (p && !p->IsObject()) throw InputError(where + ": 'parameters' must be an object");
  return p;
}

void WriteElements(json::Writer& w, const NpyArray& a) {
  const uint8_t* p = a.data.data();
  int64_t n = a.NumElements();
  DLDataType t = a.dtype;
  auto each = [&](auto tag, auto put) {
    using T = decltype(tag);
    for (int64_t k = 0; k < n; ++k) {
      T x;
      std::memcpy(&x, p + k * sizeof(T), sizeof(T));
      put(x);
    }
  };
  w.BeginArray();
  switch (t.code) {
    case kDLFloat:
      if (t.bits == 32) each(float(), [&](float x) { w.Float(x); });
      else if (t.bits == 64) each(double(), [&](double x) { w.Double(x); });
      else if (t.bits == 16) each(uint16_t(), [&](uint16_t x) { w.Float(HalfToFloat(x)); });
      break;
    case kDLInt:
      if (t.bits == 8) each(int8_t(), [&](int8_t x) { w.Int(x); });
      else if (t.bits == 16) each(int16_t(), [&](int16_t x) { w.Int(x); });
      else if (t.bits == 32) each(int32_t(), [&](int32_t x) { w.Int(x); });
      else if (t.bits == 64) each(int64_t(), [&](int64_t x) { w.Int(x); });
      break;
    case kDLUInt:
      if (t.bits == 8) each(uint8_t(), [&](uint8_t x) { w.Uint(x); });
      else if (t.bits == 16) each(uint16_t(), [&](uint16_t x) { w.Uint(x); });
      else if (t.bits == 32) each(uint32_t(), [&](uint32_t x) { w.Uint(x); });
      else if (t.bits == 64) each(uint64_t(), [&](uint64_t x) { w.Uint(x); });
      break;
    case kDLBool:
      each(uint8_t(), [&](uint8_t x) { w.Bool(x != 0); });
      break;
  }
  w.EndArray();
}

void TensorMetadata(json::Writer& w, const std::vector<TensorSpec>& specs) {
  w.BeginArray();
  for (const TensorSpec& s : specs) {
    w.BeginObject().Key("name").String(s.name).Key("datatype").String(DatatypeName(s.dtype)).Key("shape").BeginArray();
    for (int64_t d : s.shape) w.Int(d);
    w.EndArray().EndObject();
  }
  w.EndArray();
}

}  // namespace

std::string DatatypeName(DLDataType t) {
  if (t.lanes != 1) return "";
  switch (t.code) {
    case kDLBool: return "BOOL";
    case kDLFloat:
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "FP" + std::to_string(t.bits);
      break;
    case kDLInt:
      if (t.bits == 8 || t.bits == 16 || t.bits == 32 || t.bits == 64) return "INT" + std::to_string(t.bits);
      break;
    case kDLUInt:
      if (t.bits == 1) return "BOOL";
      if (t.bits == 8 || t.bits == 16 || t.bits == 32 || t.bits == 64) return "UINT" + std::to_string(t.bits);
      break;
    case kDLBfloat:
      if (t.bits == 16) return "BF16";
      break;
  }
  return "";
}

bool DatatypeFromName(std::string_view name, DLDataType* out) {
  static const struct {
    const char* name;
    DLDataType t;
  } kTypes[] = {
      {"BOOL", {kDLBool, 8, 1}},    {"UINT8", {kDLUInt, 8, 1}},   {"UINT16", {kDLUInt, 16, 1}},
      {"UINT32", {kDLUInt, 32, 1}}, {"UINT64", {kDLUInt, 64, 1}}, {"INT8", {kDLInt, 8, 1}},
      {"INT16", {kDLInt, 16, 1}},   {"INT32", {kDLInt, 32, 1}},   {"INT64", {kDLInt, 64, 1}},
      {"FP16", {kDLFloat, 16, 1}},  {"FP32", {kDLFloat, 32, 1}},  {"FP64", {kDLFloat, 64, 1}},
  };
  for (const auto& e : kTypes) {
    if (name == e.name) {
      *out = e.t;
      return true;
    }
  }
  return false;
}

InferRequest DecodeInferRequest(const Bundle& b, std::string_view body, size_t json_length) {
  if (json_length != kNoBinary && json_length > body.size()) {
    throw InputError("Inference-Header-Content-Length " + std::to_string(json_length) + " is larger than the body (" +
                     std::to_string(body.size()) + " bytes)");
  }
  std::string_view text = json_length == kNoBinary ? body : body.substr(0, json_length);
  std::string_view binary = json_length == kNoBinary ? std::string_view() : body.substr(json_length);
  json::Value doc;
  std::string err;
  if (!json::Parse(text, &doc, &err, 32)) throw InputError("the request is not valid JSON: " + err);
  if (!doc.IsObject()) throw InputError("the request must be a JSON object");

  InferRequest req;
  if (const json::Value* id = doc.Find("id")) {
    if (!id->IsString()) throw InputError("'id' must be a string");
    req.has_id = true;
    req.id = id->str;
  }
  bool binary_output = GetBool(Params(doc, "the request"), "binary_data_output", false, "the request");

  const json::Value* inputs = doc.Find("inputs");
  if (!inputs || !inputs->IsArray()) throw InputError("'inputs' must be an array of tensors");
  req.inputs.resize(b.inputs.size());
  std::vector<bool> seen(b.inputs.size(), false);
  size_t cursor = 0;  // into the binary part, in the order the inputs appear
  for (size_t n = 0; n < inputs->items.size(); ++n) {
    const json::Value& in = inputs->items[n];
    std::string where = "inputs[" + std::to_string(n) + "]";
    if (!in.IsObject()) throw InputError(where + " must be an object");
    const json::Value* name = in.Find("name");
    if (!name || !name->IsString()) throw InputError(where + ": 'name' must be a string");
    size_t k = 0;
    while (k < b.inputs.size() && b.inputs[k].name != name->str) ++k;
    if (k == b.inputs.size()) {
      throw InputError("unknown input '" + name->str + "'; the model's inputs are: " + Names(b.inputs));
    }
    const TensorSpec& spec = b.inputs[k];
    where = "input '" + spec.name + "'";
    if (seen[k]) throw InputError(where + " is given twice");
    seen[k] = true;

    const json::Value* dt = in.Find("datatype");
    if (!dt || !dt->IsString()) throw InputError(where + ": 'datatype' must be a string");
    DLDataType t;
    if (dt->str == "BYTES") {
      throw InputError(where + ": BYTES tensors are not supported; the model's inputs are numeric (" +
                       DatatypeName(spec.dtype) + ")");
    }
    if (!DatatypeFromName(dt->str, &t)) throw InputError(where + ": unknown or unsupported datatype '" + dt->str + "'");
    if (DatatypeName(t) != DatatypeName(spec.dtype)) {
      throw InputError(where + ": datatype " + dt->str + " does not match the model's " + DatatypeName(spec.dtype));
    }
    const json::Value* shape = in.Find("shape");
    if (!shape || !shape->IsArray()) throw InputError(where + ": 'shape' must be an array of integers");
    std::vector<int64_t> dims;
    for (const json::Value& d : shape->items) {
      if (!d.IsNumber() || !d.integral || d.negative || d.u > uint64_t(std::numeric_limits<int64_t>::max())) {
        throw InputError(where + ": 'shape' must be an array of non-negative integers");
      }
      dims.push_back(int64_t(d.u));
    }
    if (dims != spec.shape) {
      throw InputError(where + ": shape " + ShapeText(dims) + " does not match the model's " + ShapeText(spec.shape));
    }
    NpyArray& a = req.inputs[k];
    a.dtype = spec.dtype;
    a.shape = spec.shape;
    size_t bytes = spec.Bytes();
    size_t elem_size = (spec.dtype.bits + 7) / 8;
    size_t count = elem_size ? bytes / elem_size : 0;

    const json::Value* params = Params(in, where);
    if (params && params->Find("shared_memory_region")) {
      throw InputError(where + ": shared memory is not supported by this service; send the data in the request");
    }
    const json::Value* bsize = params ? params->Find("binary_data_size") : nullptr;
    if (bsize) {
      if (!bsize->IsNumber() || !bsize->integral || bsize->negative) {
        throw InputError(where + ": 'binary_data_size' must be a non-negative integer");
      }
      if (json_length == kNoBinary) {
        throw InputError(where + ": 'binary_data_size' given, but the request has no Inference-Header-Content-Length");
      }
      if (bsize->u != bytes) {
        throw InputError(where + ": binary_data_size " + std::to_string(bsize->u) + " is not the " +
                         std::to_string(bytes) + " bytes of a " + DatatypeName(spec.dtype) + ShapeText(spec.shape) +
                         " tensor");
      }
      if (binary.size() - cursor < bytes) {
        throw InputError(where + ": the binary data ends before its " + std::to_string(bytes) + " bytes");
      }
      a.data.assign(reinterpret_cast<const uint8_t*>(binary.data()) + cursor,
                    reinterpret_cast<const uint8_t*>(binary.data()) + cursor + bytes);
      cursor += bytes;
      continue;
    }
    const json::Value* data = in.Find("data");
    if (!data) throw InputError(where + ": no 'data' and no binary_data_size");
    a.data.assign(bytes, 0);
    Filler f{StoreFor(spec.dtype), a.data.data(), elem_size, count};
    if (!f.store) throw InputError(where + ": the model's datatype cannot be sent as JSON");
    if (!f.Walk(*data)) {
      throw InputError(where + ": element " + std::to_string(f.count) + " is not " + Expected(spec.dtype));
    }
    if (f.count != count) {
      throw InputError(where + ": 'data' has " + std::to_string(f.count) + " element(s); shape " +
                       ShapeText(spec.shape) + " needs " + std::to_string(count));
    }
  }
  for (size_t k = 0; k < b.inputs.size(); ++k) {
    if (!seen[k]) throw InputError("input '" + b.inputs[k].name + "' is missing");
  }
  if (cursor != binary.size()) {
    throw InputError(std::to_string(binary.size() - cursor) + " byte(s) of binary data after the inputs' data");
  }

  const json::Value* outputs = doc.Find("outputs");
  if (outputs) {
    if (!outputs->IsArray()) throw InputError("'outputs' must be an array");
    std::vector<bool> wanted(b.outputs.size(), false);
    for (size_t n = 0; n < outputs->items.size(); ++n) {
      const json::Value& o = outputs->items[n];
      std::string where = "outputs[" + std::to_string(n) + "]";
      if (!o.IsObject()) throw InputError(where + " must be an object");
      const json::Value* name = o.Find("name");
      if (!name || !name->IsString()) throw InputError(where + ": 'name' must be a string");
      size_t k = 0;
      while (k < b.outputs.size() && b.outputs[k].name != name->str) ++k;
      if (k == b.outputs.size()) {
        throw InputError("unknown output '" + name->str + "'; the model's outputs are: " + Names(b.outputs));
      }
      where = "output '" + name->str + "'";
      if (wanted[k]) throw InputError(where + " is requested twice");
      wanted[k] = true;
      const json::Value* params = Params(o, where);
      if (params) {
        if (params->Find("shared_memory_region")) throw InputError(where + ": shared memory is not supported");
        const json::Value* cls = params->Find("classification");
        if (cls && !(cls->IsNumber() && cls->integral && cls->u == 0 && !cls->negative)) {
          throw InputError(where + ": the classification extension is not supported");
        }
      }
      req.outputs.push_back(k);
      req.binary.push_back(GetBool(params, "binary_data", binary_output, where));
    }
  } else {
    for (size_t k = 0; k < b.outputs.size(); ++k) {
      req.outputs.push_back(k);
      req.binary.push_back(binary_output);
    }
  }
  return req;
}

std::string EncodeInferResponse(const Bundle& b, const InferRequest& req, const std::vector<NpyArray>& outputs,
                                size_t* json_length) {
  json::Writer w(json::Writer::kCompact);
  size_t text_guess = 256;
  for (size_t n = 0; n < req.outputs.size(); ++n) {
    if (!req.binary[n]) text_guess += size_t(outputs[req.outputs[n]].NumElements()) * 16;
  }
  w.Reserve(text_guess);
  w.BeginObject().Key("model_name").String(b.name).Key("model_version").String(b.bundle_id);
  if (req.has_id) w.Key("id").String(req.id);
  w.Key("outputs").BeginArray();
  bool any_binary = false;
  for (size_t n = 0; n < req.outputs.size(); ++n) {
    const NpyArray& a = outputs[req.outputs[n]];
    w.BeginObject().Key("name").String(b.outputs[req.outputs[n]].name).Key("datatype").String(DatatypeName(a.dtype));
    w.Key("shape").BeginArray();
    for (int64_t d : a.shape) w.Int(d);
    w.EndArray();
    if (req.binary[n]) {
      any_binary = true;
      w.Key("parameters").BeginObject().Key("binary_data_size").Uint(a.data.size()).EndObject();
    } else {
      w.Key("data");
      WriteElements(w, a);
    }
    w.EndObject();
  }
  w.EndArray().EndObject();
  if (!any_binary) {
    *json_length = kNoBinary;
    return w.Take();
  }
  std::string body = w.Take();
  *json_length = body.size();
  size_t total = body.size();
  for (size_t n = 0; n < req.outputs.size(); ++n) {
    if (req.binary[n]) total += outputs[req.outputs[n]].data.size();
  }
  body.reserve(total);
  for (size_t n = 0; n < req.outputs.size(); ++n) {
    if (!req.binary[n]) continue;
    const NpyArray& a = outputs[req.outputs[n]];
    body.append(reinterpret_cast<const char*>(a.data.data()), a.data.size());
  }
  return body;
}

std::string ServerMetadata(const std::string& version) {
  json::Writer w(json::Writer::kCompact);
  w.BeginObject().Key("name").String("tvm-deploy").Key("version").String(version);
  w.Key("extensions").BeginArray().String("binary_tensor_data").EndArray().EndObject();
  return w.Take();
}

std::string ModelMetadata(const Bundle& b) {
  json::Writer w(json::Writer::kCompact);
  w.BeginObject().Key("name").String(b.name).Key("versions").BeginArray().String(b.bundle_id).EndArray();
  w.Key("platform").String("tvm").Key("inputs");
  TensorMetadata(w, b.inputs);
  w.Key("outputs");
  TensorMetadata(w, b.outputs);
  w.EndObject();
  return w.Take();
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ff;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t exp = (x >> 23) & 0xff;
  uint32_t man = x & 0x7fffff;
  if (exp == 0xff) return uint16_t(sign | 0x7c00 | (man ? 0x200 | (man >> 13) : 0));  // inf, nan
  int e = int(exp) - 127 + 15;
  if (e >= 31) return uint16_t(sign | 0x7c00);  // overflow: inf
  if (e <= 0) {
    if (e < -10) return uint16_t(sign);  // underflow: zero
    man |= 0x800000;
    int shift = 14 - e;
    uint32_t half = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t half = sign | (uint32_t(e) << 10) | (man >> 13);
  uint32_t rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;  // may carry into the exponent: correct
  return uint16_t(half);
}

}  // namespace v2
}  // namespace tvmbundle
