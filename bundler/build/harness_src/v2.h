// Open Inference Protocol v2 (KServe / Triton HTTP) payloads for the bundle's one model:
// metadata, and inference requests and responses as JSON tensors or with the binary tensor data
// extension (Inference-Header-Content-Length). Pure functions; the service calls them on its
// inference thread. Errors in a request throw InputError (HTTP 400).
#ifndef TVMBUNDLE_V2_H_
#define TVMBUNDLE_V2_H_

#include <string>
#include <string_view>
#include <vector>

#include "model.h"
#include "npy.h"

namespace tvmbundle {
namespace v2 {

// The protocol's datatype ("FP32", "INT64", "BOOL", ...) for a DLPack type; "" when it has none.
std::string DatatypeName(DLDataType t);
// The reverse, for the types this service can carry (not BYTES or BF16); false when unknown.
bool DatatypeFromName(std::string_view name, DLDataType* out);

struct InferRequest {
  bool has_id = false;
  std::string id;
  std::vector<NpyArray> inputs;  // in the model's input order, checked against its signature
  std::vector<size_t> outputs;   // indices of the requested outputs (all, in model order, when none named)
  std::vector<bool> binary;      // per requested output: binary tensor data or JSON
};

constexpr size_t kNoBinary = size_t(-1);

// json_length: the Inference-Header-Content-Length value, or kNoBinary when the body is all JSON.
InferRequest DecodeInferRequest(const Bundle& b, std::string_view body, size_t json_length);
// The response body; *json_length is the JSON header's size when any output is binary, else kNoBinary.
std::string EncodeInferResponse(const Bundle& b, const InferRequest& req, const std::vector<NpyArray>& outputs,
                                size_t* json_length);

std::string ServerMetadata(const std::string& version);
std::string ModelMetadata(const Bundle& b);

// IEEE half <-> float, round to nearest even.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);

}  // namespace v2
}  // namespace tvmbundle

#endif  // TVMBUNDLE_V2_H_
