// The harness's one JSON writer (info, bench and selftest output, the service's answers) and a
// small reader for the service's requests and `probe`. No third-party code; no locale: numbers
// are written and read with std::to_chars/from_chars.
#ifndef TVMBUNDLE_JSON_H_
#define TVMBUNDLE_JSON_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tvmbundle {
namespace json {

// Appends `s` as a quoted JSON string (control characters as \uXXXX, invalid UTF-8 passed through).
void AppendQuoted(std::string* out, std::string_view s);
std::string Quote(std::string_view s);

// Streams one JSON document into a string; commas and colons are placed for the caller.
//   Writer w; w.BeginObject().Key("a").Int(1).Key("b").BeginArray().Bool(true).EndArray().EndObject();
// Spaced style writes ", " and ": " (the CLI's --json output); compact writes "," and ":".
class Writer {
 public:
  enum Style { kSpaced, kCompact };
  explicit Writer(Style style = kSpaced) : spaced_(style == kSpaced) {}

  Writer& BeginObject() { return Open('{'); }
  Writer& EndObject() { return Close('}'); }
  Writer& BeginArray() { return Open('['); }
  Writer& EndArray() { return Close(']'); }
  Writer& Key(std::string_view k);
  Writer& String(std::string_view s);
  Writer& Int(int64_t v);
  Writer& Uint(uint64_t v);
  // Shortest text that reads back to the same value; NaN and infinities as NaN/Infinity/-Infinity
  // (what Python's json and numpy read; strict JSON has no spelling for them).
  Writer& Double(double v);
  Writer& Float(float v);
  Writer& Fixed(double v, int decimals);  // printf("%.*f"), for human-facing figures
  Writer& Bool(bool v);
  Writer& Null();
  Writer& Raw(std::string_view text);  // a value already written as JSON

  const std::string& str() const { return out_; }
  std::string Take() { return std::move(out_); }
  std::string* buffer() { return &out_; }
  void Reserve(size_t n) { out_.reserve(n); }

 private:
  Writer& Open(char c);
  Writer& Close(char c);
  void BeforeValue();

  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
  bool spaced_;
};

// A parsed JSON value. Numbers keep their integer value exactly when the literal is an integer
// (so INT64/UINT64 tensor data survives), and their double value always.
struct Value {
  enum Type : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = kNull;
  bool boolean = false;
  bool integral = false;   // the literal had no fraction or exponent and fits int64 or uint64
  bool negative = false;   // with integral: the value is in `i` (negative) or `u` (non-negative)
  double number = 0;
  int64_t i = 0;
  uint64_t u = 0;
  std::string str;
  std::vector<Value> items;                          // array elements, or object member values
  std::vector<std::string> keys;                     // object member names, parallel to items

  bool IsObject() const { return type == kObject; }
  bool IsArray() const { return type == kArray; }
  bool IsString() const { return type == kString; }
  bool IsNumber() const { return type == kNumber; }
  bool IsBool() const { return type == kBool; }
  // The member named `key` of an object (the last one when repeated), or nullptr.
  const Value* Find(std::string_view key) const;
};

// Parses exactly one JSON document (surrounding whitespace allowed). Also reads NaN, Infinity and
// -Infinity. Nesting is limited to `max_depth`. False with *error (position and reason) on bad input.
bool Parse(std::string_view text, Value* out, std::string* error, int max_depth = 64);

}  // namespace json
}  // namespace tvmbundle

#endif  // TVMBUNDLE_JSON_H_
