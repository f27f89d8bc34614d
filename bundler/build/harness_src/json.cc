#include "json.h"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace tvmbundle {
namespace json {

void AppendQuoted(std::string* out, std::string_view s) {
  out->push_back('"');
  size_t run = 0;  // start of the pending run of bytes that need no escape
  for (size_t k = 0; k < s.size(); ++k) {
    unsigned char c = static_cast<unsigned char>(s[k]);
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    out->append(s.data() + run, k - run);
    run = k + 1;
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\t': out->append("\\t"); break;
      case '\r': out->append("\\r"); break;
      default: {
        char b[8];
        std::snprintf(b, sizeof(b), "\\u%04x", c);
        out->append(b);
      }
    }
  }
  out->append(s.data() + run, s.size() - run);
  out->push_back('"');
}

std::string Quote(std::string_view s) {
  std::string out;
  AppendQuoted(&out, s);
  return out;
}

// ---- Writer --------------------------------------------------------------------------------

void Writer::BeforeValue() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (!first_.empty()) {
    if (!first_.back()) out_.append(spaced_ ? ", " : ",");
    first_.back() = false;
  }
}

Writer& Writer::Open(char c) {
  BeforeValue();
  out_.push_back(c);
  first_.push_back(true);
  return *this;
}

Writer& Writer::Close(char c) {
  out_.push_back(c);
  if (!first_.empty()) first_.pop_back();
  return *this;
}

Writer& Writer::Key(std::string_view k) {
  BeforeValue();
  AppendQuoted(&out_, k);
  out_.append(spaced_ ? ": " : ":");
  after_key_ = true;
  return *this;
}

Writer& Writer::String(std::string_view s) {
  BeforeValue();
  AppendQuoted(&out_, s);
  return *this;
}

Writer& Writer::Int(int64_t v) {
  BeforeValue();
  char b[24];
  auto r = std::to_chars(b, b + sizeof(b), v);
  out_.append(b, r.ptr);
  return *this;
}

Writer& Writer::Uint(uint64_t v) {
  BeforeValue();
  char b[24];
  auto r = std::to_chars(b, b + sizeof(b), v);
  out_.append(b, r.ptr);
  return *this;
}

namespace {
bool NonFinite(std::string* out, double v) {
  if (std::isnan(v)) out->append("NaN");
  else if (std::isinf(v)) out->append(v > 0 ? "Infinity" : "-Infinity");
  else return false;
  return true;
}
}  // namespace

Writer& Writer::Double(double v) {
  BeforeValue();
  if (NonFinite(&out_, v)) return *this;
  char b[32];
  auto r = std::to_chars(b, b + sizeof(b), v);
  out_.append(b, r.ptr);
  return *this;
}

Writer& Writer::Float(float v) {
  BeforeValue();
  if (NonFinite(&out_, v)) return *this;
  char b[32];
  auto r = std::to_chars(b, b + sizeof(b), v);
  out_.append(b, r.ptr);
  return *this;
}

Writer& Writer::Fixed(double v, int decimals) {
  BeforeValue();
  if (NonFinite(&out_, v)) return *this;
  char b[64];
  int n = std::snprintf(b, sizeof(b), "%.*f", decimals, v);
  out_.append(b, n > 0 && n < int(sizeof(b)) ? size_t(n) : 0);
  return *this;
}

Writer& Writer::Bool(bool v) {
  BeforeValue();
  out_.append(v ? "true" : "false");
  return *this;
}

Writer& Writer::Null() {
  BeforeValue();
  out_.append("null");
  return *this;
}

Writer& Writer::Raw(std::string_view text) {
  BeforeValue();
  out_.append(text);
  return *this;
}

// ---- Reader --------------------------------------------------------------------------------

const Value* Value::Find(std::string_view key) const {
  if (type != kObject) return nullptr;
  for (size_t k = keys.size(); k-- > 0;) {
    if (keys[k] == key) return &items[k];
  }
  return nullptr;
}

namespace {

class Parser {
 public:
  Parser(std::string_view text, int max_depth) : p_(text.data()), begin_(text.data()), end_(text.data() + text.size()),
                                                 max_depth_(max_depth) {}

  bool Document(Value* out, std::string* error) {
    SkipSpace();
    if (!ParseValue(out, 0)) {
      *error = error_ + " at offset " + std::to_string(pos_of_error_ - begin_);
      return false;
    }
    SkipSpace();
    if (p_ != end_) {
      *error = "unexpected text after the JSON value at offset " + std::to_string(p_ - begin_);
      return false;
    }
    return true;
  }

 private:
  bool Fail(const char* why) {
    if (error_.empty()) {
      error_ = why;
      pos_of_error_ = p_;
    }
    return false;
  }

  void SkipSpace() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  bool Literal(const char* word) {
    size_t n = std::strlen(word);
    if (size_t(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return Fail("invalid literal");
    p_ += n;
    return true;
  }

  bool ParseValue(Value* v, int depth) {
    if (p_ >= end_) return Fail("unexpected end of JSON");
    switch (*p_) {
      case '{': return ParseObject(v, depth + 1);
      case '[': return ParseArray(v, depth + 1);
      case '"': v->type = Value::kString; return ParseString(&v->str);
      case 't': v->type = Value::kBool; v->boolean = true; return Literal("true");
      case 'f': v->type = Value::kBool; v->boolean = false; return Literal("false");
      case 'n': v->type = Value::kNull; return Literal("null");
      case 'N':
        v->type = Value::kNumber;
        v->number = std::numeric_limits<double>::quiet_NaN();
        return Literal("NaN");
      case 'I':
        v->type = Value::kNumber;
        v->number = std::numeric_limits<double>::infinity();
        return Literal("Infinity");
      default: return ParseNumber(v);
    }
  }

  bool ParseObject(Value* v, int depth) {
    if (depth > max_depth_) return Fail("JSON nested too deeply");
    v->type = Value::kObject;
    ++p_;
    SkipSpace();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return true;
    }
    while (true) {
      SkipSpace();
      if (p_ >= end_ || *p_ != '"') return Fail("expected a member name");
      v->keys.emplace_back();
      if (!ParseString(&v->keys.back())) return false;
      SkipSpace();
      if (p_ >= end_ || *p_ != ':') return Fail("expected ':'");
      ++p_;
      SkipSpace();
      v->items.emplace_back();
      if (!ParseValue(&v->items.back(), depth)) return false;
      SkipSpace();
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        continue;
      }
      if (p_ < end_ && *p_ == '}') {
        ++p_;
        return true;
      }
      return Fail("expected ',' or '}'");
    }
  }

  bool ParseArray(Value* v, int depth) {
    if (depth > max_depth_) return Fail("JSON nested too deeply");
    v->type = Value::kArray;
    ++p_;
    SkipSpace();
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      return true;
    }
    while (true) {
      SkipSpace();
      v->items.emplace_back();
      if (!ParseValue(&v->items.back(), depth)) return false;
      SkipSpace();
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        continue;
      }
      if (p_ < end_ && *p_ == ']') {
        ++p_;
        return true;
      }
      return Fail("expected ',' or ']'");
    }
  }

  static int Hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  bool Hex4(uint32_t* out) {
    if (end_ - p_ < 4) return Fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      int h = Hex(p_[k]);
      if (h < 0) return Fail("bad \\u escape");
      v = v * 16 + uint32_t(h);
    }
    p_ += 4;
    *out = v;
    return true;
  }

  static void AppendUtf8(std::string* s, uint32_t cp) {
    if (cp < 0x80) {
      s->push_back(char(cp));
    } else if (cp < 0x800) {
      s->push_back(char(0xC0 | (cp >> 6)));
      s->push_back(char(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      s->push_back(char(0xE0 | (cp >> 12)));
      s->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      s->push_back(char(0x80 | (cp & 0x3F)));
    } else {
      s->push_back(char(0xF0 | (cp >> 18)));
      s->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
      s->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      s->push_back(char(0x80 | (cp & 0x3F)));
    }
  }

  bool ParseString(std::string* s) {
    ++p_;  // the opening quote
    while (true) {
      const char* run = p_;
      while (p_ < end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20) ++p_;
      s->append(run, size_t(p_ - run));
      if (p_ >= end_) return Fail("unterminated string");
      char c = *p_;
      if (c == '"') {
        ++p_;
        return true;
      }
      if (c != '\\') return Fail("control character in string");
      ++p_;
      if (p_ >= end_) return Fail("unterminated string");
      char e = *p_++;
      switch (e) {
        case '"': s->push_back('"'); break;
        case '\\': s->push_back('\\'); break;
        case '/': s->push_back('/'); break;
        case 'b': s->push_back('\b'); break;
        case 'f': s->push_back('\f'); break;
        case 'n': s->push_back('\n'); break;
        case 'r': s->push_back('\r'); break;
        case 't': s->push_back('\t'); break;
        case 'u': {
          uint32_t cp;
          if (!Hex4(&cp)) return false;
          if (cp >= 0xD800 && cp < 0xDC00) {
            uint32_t lo;
            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') return Fail("unpaired surrogate");
            p_ += 2;
            if (!Hex4(&lo)) return false;
            if (lo < 0xDC00 || lo >= 0xE000) return Fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            return Fail("unpaired surrogate");
          }
          AppendUtf8(s, cp);
          break;
        }
        default: return Fail("bad escape in string");
      }
    }
  }

  bool ParseNumber(Value* v) {
    const char* start = p_;
    v->type = Value::kNumber;
    bool neg = false;
    if (p_ < end_ && *p_ == '-') {
      neg = true;
      ++p_;
      if (p_ < end_ && *p_ == 'I') {
        if (!Literal("Infinity")) return false;
        v->number = -std::numeric_limits<double>::infinity();
        return true;
      }
    }
    if (p_ >= end_ || *p_ < '0' || *p_ > '9') return Fail("invalid value");
    if (*p_ == '0' && p_ + 1 < end_ && p_[1] >= '0' && p_[1] <= '9') return Fail("leading zero in number");
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    bool integral = true;
    if (p_ < end_ && *p_ == '.') {
      integral = false;
      ++p_;
      if (p_ >= end_ || *p_ < '0' || *p_ > '9') return Fail("invalid number");
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      integral = false;
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ >= end_ || *p_ < '0' || *p_ > '9') return Fail("invalid number");
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    auto r = std::from_chars(start, p_, v->number);
    if (r.ec == std::errc::result_out_of_range) {
      // from_chars leaves the value alone on overflow: what strtod would give.
      v->number = std::strtod(std::string(start, p_).c_str(), nullptr);
    } else if (r.ec != std::errc() || r.ptr != p_) {
      return Fail("invalid number");
    }
    if (integral) {
      if (neg) {
        auto ri = std::from_chars(start, p_, v->i);
        v->integral = ri.ec == std::errc() && ri.ptr == p_;
        v->negative = true;
        if (v->integral && v->i == 0) {  // "-0"
          v->negative = false;
          v->u = 0;
        }
      } else {
        auto ru = std::from_chars(start, p_, v->u);
        v->integral = ru.ec == std::errc() && ru.ptr == p_;
      }
    }
    return true;
  }

  const char* p_;
  const char* begin_;
  const char* end_;
  int max_depth_;
  std::string error_;
  const char* pos_of_error_ = nullptr;
};

}  // namespace

bool Parse(std::string_view text, Value* out, std::string* error, int max_depth) {
  *out = Value();
  Parser p(text, max_depth);
  return p.Document(out, error);
}

}  // namespace json
}  // namespace tvmbundle
