#include "npy.h"

#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

namespace tvmbundle {
namespace {

struct DTypeEntry {
  const char* name;
  const char* descr;  // numpy's little-endian descr
  DLDataType dtype;
};

const DTypeEntry kDTypes[] = {
    {"float32", "<f4", {kDLFloat, 32, 1}}, {"float64", "<f8", {kDLFloat, 64, 1}},
    {"float16", "<f2", {kDLFloat, 16, 1}}, {"int8", "|i1", {kDLInt, 8, 1}},
    {"int16", "<i2", {kDLInt, 16, 1}},     {"int32", "<i4", {kDLInt, 32, 1}},
    {"int64", "<i8", {kDLInt, 64, 1}},     {"uint8", "|u1", {kDLUInt, 8, 1}},
    {"uint16", "<u2", {kDLUInt, 16, 1}},   {"uint32", "<u4", {kDLUInt, 32, 1}},
    {"uint64", "<u8", {kDLUInt, 64, 1}},   {"bool", "|b1", {kDLBool, 8, 1}},
};

bool SameDType(DLDataType a, DLDataType b) { return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes; }

// The header is a Python dict literal; numpy writes it in a fixed style, but
// other writers vary spacing and key order, so look keys up instead of matching text.
std::string FindValue(const std::string& header, const std::string& key) {
  for (const char* quote : {"'", "\""}) {
    std::string k = std::string(quote) + key + quote;
    size_t pos = header.find(k);
    if (pos == std::string::npos) continue;
    pos = header.find(':', pos + k.size());
    if (pos == std::string::npos) return "";
    pos = header.find_first_not_of(" \t", pos + 1);
    if (pos == std::string::npos) return "";
    size_t end;
    if (header[pos] == '(') {
      end = header.find(')', pos);
      return end == std::string::npos ? "" : header.substr(pos, end - pos + 1);
    }
    if (header[pos] == '\'' || header[pos] == '"') {
      end = header.find(header[pos], pos + 1);
      return end == std::string::npos ? "" : header.substr(pos + 1, end - pos - 1);
    }
    end = header.find_first_of(",}", pos);
    std::string v = header.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.pop_back();
    return v;
  }
  return "";
}

}  // namespace

int64_t NpyArray::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

bool DTypeFromName(const std::string& name, DLDataType* out) {
  for (const auto& e : kDTypes) {
    if (name == e.name) {
      *out = e.dtype;
      return true;
    }
  }
  return false;
}

std::string DTypeName(DLDataType dtype) {
  for (const auto& e : kDTypes) {
    if (SameDType(e.dtype, dtype)) return e.name;
  }
  // Bool as TVM may report it: one-bit unsigned.
  if (dtype.code == kDLUInt && dtype.bits == 1) return "bool";
  std::ostringstream os;
  os << "dtype(code=" << int(dtype.code) << ",bits=" << int(dtype.bits) << ",lanes=" << dtype.lanes << ")";
  return os.str();
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? "," : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

NpyArray ParseNpy(const uint8_t* buf, size_t len, size_t* consumed, const std::string& what) {
  static const uint8_t kMagic[] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (len < 10 || std::memcmp(buf, kMagic, 6) != 0) throw InputError(what + ": not an .npy file");
  int major = buf[6];
  size_t header_len, offset;
  if (major == 1) {
    header_len = buf[8] | (size_t(buf[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (len < 12) throw InputError(what + ": truncated .npy header");
    header_len = buf[8] | (size_t(buf[9]) << 8) | (size_t(buf[10]) << 16) | (size_t(buf[11]) << 24);
    offset = 12;
  } else {
    throw InputError(what + ": unsupported .npy format version " + std::to_string(major));
  }
  if (header_len > len - offset) throw InputError(what + ": truncated .npy header");
  std::string header(reinterpret_cast<const char*>(buf + offset), header_len);
  offset += header_len;

  NpyArray arr;
  std::string descr = FindValue(header, "descr");
  bool known = false;
  for (const auto& e : kDTypes) {
    std::string alt = e.descr;
    alt[0] = '=';  // native order, little-endian on every board we build for
    if (descr == e.descr || descr == alt || (e.descr[0] == '|' && descr.size() == 3 && descr.substr(1) ==
                                                                                        std::string(e.descr + 1))) {
      arr.dtype = e.dtype;
      known = true;
      break;
    }
  }
  if (!known) {
    if (!descr.empty() && descr[0] == '>') throw InputError(what + ": big-endian arrays are not supported");
    throw InputError(what + ": unsupported dtype '" + descr + "'");
  }
  if (FindValue(header, "fortran_order") == "True") {
    throw InputError(what + ": Fortran-order arrays are not supported; save with np.ascontiguousarray");
  }
  std::string shape = FindValue(header, "shape");
  if (shape.size() < 2 || shape.front() != '(') throw InputError(what + ": .npy header has no shape");
  std::string body = shape.substr(1, shape.size() - 2);
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \tL");
    if (b == std::string::npos) continue;
    item = item.substr(b, e - b + 1);
    char* end = nullptr;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end != '\0' || v < 0) throw InputError(what + ": bad shape " + shape);
    arr.shape.push_back(v);
  }
  // Guard the multiplication: a hostile header must not make us allocate wildly.
  size_t bytes = arr.dtype.bits / 8;
  for (int64_t d : arr.shape) {
    if (d != 0 && bytes > std::numeric_limits<size_t>::max() / size_t(d)) throw InputError(what + ": shape too large");
    bytes *= size_t(d);
  }
  if (bytes > len - offset) {
    throw InputError(what + ": truncated: the header promises " + std::to_string(bytes) + " bytes of data, " +
                     std::to_string(len - offset) + " are there");
  }
  arr.data.assign(buf + offset, buf + offset + bytes);
  if (consumed) *consumed = offset + bytes;
  return arr;
}

NpyArray LoadNpy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw InputError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<uint8_t> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t used = 0;
  NpyArray arr = ParseNpy(buf.data(), buf.size(), &used, path);
  if (used != buf.size()) throw InputError(path + ": " + std::to_string(buf.size() - used) + " bytes after the array");
  return arr;
}

std::string SerializeNpy(DLDataType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes) {
  std::string descr;
  for (const auto& e : kDTypes) {
    if (SameDType(e.dtype, dtype)) descr = e.descr;
  }
  if (descr.empty()) throw std::runtime_error("cannot write dtype " + DTypeName(dtype) + " as .npy");
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + ShapeString(shape) + ", }";
  // numpy pads the header with spaces so that the data starts 64-byte aligned.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(char(header.size() & 0xff));
  out.push_back(char((header.size() >> 8) & 0xff));
  out += header;
  out.append(static_cast<const char*>(data), nbytes);
  return out;
}

void SaveNpy(const std::string& path, DLDataType dtype, const std::vector<int64_t>& shape, const void* data,
             size_t nbytes) {
  std::string bytes = SerializeNpy(dtype, shape, data, nbytes);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw InputError(path + ": cannot write (" + std::strerror(errno) + ")");
  f.write(bytes.data(), std::streamsize(bytes.size()));
  if (!f) throw InputError(path + ": write failed");
}

}  // namespace tvmbundle
