// .npy arrays in memory and on disk: the harness's only data format, for files
// (run, selftest) and for HTTP bodies (serve), so it parses from a byte buffer.
#ifndef TVMBUNDLE_NPY_H_
#define TVMBUNDLE_NPY_H_

#include <dlpack/dlpack.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tvmbundle {

// An error in the data a user gave us: exit code 2, HTTP 400.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct NpyArray {
  DLDataType dtype{kDLFloat, 32, 1};
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // C order, little-endian

  int64_t NumElements() const;
};

// numpy dtype name ("float32", "uint8", "bool", ...) <-> DLDataType.
bool DTypeFromName(const std::string& name, DLDataType* out);
std::string DTypeName(DLDataType dtype);
std::string ShapeString(const std::vector<int64_t>& shape);

// Parses one array at buf[0..len); sets *consumed to its size in bytes so that
// concatenated arrays can be split. Throws InputError naming `what` on bad data.
NpyArray ParseNpy(const uint8_t* buf, size_t len, size_t* consumed, const std::string& what);
NpyArray LoadNpy(const std::string& path);
std::string SerializeNpy(DLDataType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes);
void SaveNpy(const std::string& path, DLDataType dtype, const std::vector<int64_t>& shape, const void* data,
             size_t nbytes);

}  // namespace tvmbundle

#endif  // TVMBUNDLE_NPY_H_
