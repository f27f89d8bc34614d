#include "http.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace tvmbundle {
namespace http {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view Trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string_view::npos ? std::string_view() : s.substr(b, e - b + 1);
}

bool IsTokenChar(unsigned char c) {
  if (std::isalnum(c)) return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+': case '-': case '.':
    case '^': case '_': case '`': case '|': case '~':
      return true;
  }
  return false;
}

// Splits off one line ending in LF (an optional CR before it is dropped); false at the end.
bool NextLine(std::string_view head, size_t* pos, std::string_view* line) {
  if (*pos >= head.size()) return false;
  size_t nl = head.find('\n', *pos);
  if (nl == std::string_view::npos) return false;
  size_t end = nl;
  if (end > *pos && head[end - 1] == '\r') --end;
  *line = head.substr(*pos, end - *pos);
  *pos = nl + 1;
  return true;
}

bool HasToken(std::string_view list, std::string_view token) {
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t comma = list.find(',', pos);
    if (comma == std::string_view::npos) comma = list.size();
    if (Lower(Trim(list.substr(pos, comma - pos))) == token) return true;
    pos = comma + 1;
  }
  return false;
}

}  // namespace

const std::string* RequestHead::Header(std::string_view lower_name) const {
  for (const auto& h : headers) {
    if (h.first == lower_name) return &h.second;
  }
  return nullptr;
}

size_t FindHeadEnd(std::string_view buf, size_t* scanned) {
  size_t pos = *scanned;
  while (true) {
    size_t nl = buf.find('\n', pos);
    if (nl == std::string_view::npos) {
      // Resume at the last byte or two: an LF may be followed by CR LF still to come.
      *scanned = buf.size() >= 2 ? buf.size() - 2 : 0;
      return std::string_view::npos;
    }
    if (nl + 1 < buf.size() && buf[nl + 1] == '\n') return nl + 2;
    if (nl + 2 < buf.size() && buf[nl + 1] == '\r' && buf[nl + 2] == '\n') return nl + 3;
    if (nl + 2 >= buf.size()) {
      *scanned = nl;
      return std::string_view::npos;
    }
    pos = nl + 1;
  }
}

bool ParseRequestHead(std::string_view head, RequestHead* out, int* status, std::string* problem) {
  *status = 400;
  size_t pos = 0;
  std::string_view line;
  if (!NextLine(head, &pos, &line)) {
    *problem = "malformed request line";
    return false;
  }
  size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1 || sp1 == 0) {
    *problem = "malformed request line";
    return false;
  }
  out->method = std::string(line.substr(0, sp1));
  out->target = std::string(line.substr(sp1 + 1, sp2 - sp1 - 1));
  std::string_view version = line.substr(sp2 + 1);
  for (char c : out->method) {
    if (c < 'A' || c > 'Z') {
      *problem = "malformed method";
      return false;
    }
  }
  if (out->target.empty() || out->target[0] != '/') {
    *problem = "malformed request target";
    return false;
  }
  for (char c : out->target) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) {
      *problem = "malformed request target";
      return false;
    }
  }
  out->path = out->target.substr(0, out->target.find('?'));
  if (version == "HTTP/1.1") {
    out->minor = 1;
    out->keep_alive = true;
  } else if (version == "HTTP/1.0") {
    out->minor = 0;
    out->keep_alive = false;
  } else {
    *status = 505;
    *problem = "HTTP version '" + std::string(version.substr(0, 20)) + "' is not supported; use HTTP/1.1";
    return false;
  }
  bool ended = false;
  while (NextLine(head, &pos, &line)) {
    if (line.empty()) {
      ended = true;
      break;
    }
    size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) {
      *problem = "malformed header line";
      return false;
    }
    for (size_t k = 0; k < colon; ++k) {
      if (!IsTokenChar(static_cast<unsigned char>(line[k]))) {  // also refuses obs-fold and "Name :"
        *problem = "malformed header line";
        return false;
      }
    }
    std::string_view raw_value = line.substr(colon + 1);
    for (char c : raw_value) {
      unsigned char u = static_cast<unsigned char>(c);
      if ((u < 0x20 && u != '\t') || u == 0x7f) {  // a CR inside a line, NUL, ...
        *problem = "malformed header value";
        return false;
      }
    }
    std::string name = Lower(line.substr(0, colon));
    std::string value(Trim(raw_value));
    if (name == "content-length") {
      if (out->has_length || value.empty() || value.size() > 15 ||
          value.find_first_not_of("0123456789") != std::string::npos) {
        *problem = "bad Content-Length";
        return false;
      }
      out->has_length = true;
      out->content_length = size_t(std::strtoull(value.c_str(), nullptr, 10));
    } else if (name == "transfer-encoding") {
      out->chunked = true;
    } else if (name == "connection") {
      if (HasToken(value, "close")) out->keep_alive = false;
      else if (HasToken(value, "keep-alive")) out->keep_alive = true;
    } else if (name == "expect") {
      if (Lower(value) == "100-continue") out->expect_continue = true;
    }
    out->headers.emplace_back(std::move(name), std::move(value));
  }
  if (!ended) {
    *problem = "malformed header line";
    return false;
  }
  return true;
}

bool DecodeSegment(std::string_view in, std::string* out) {
  out->clear();
  for (size_t k = 0; k < in.size(); ++k) {
    char c = in[k];
    if (c == '%') {
      auto hex = [](char h) -> int {
        if (h >= '0' && h <= '9') return h - '0';
        if (h >= 'a' && h <= 'f') return h - 'a' + 10;
        if (h >= 'A' && h <= 'F') return h - 'A' + 10;
        return -1;
      };
      if (k + 2 >= in.size()) return false;
      int hi = hex(in[k + 1]), lo = hex(in[k + 2]);
      if (hi < 0 || lo < 0) return false;
      char d = char(hi * 16 + lo);
      if (d == '/' || d == '\0') return false;
      out->push_back(d);
      k += 2;
    } else {
      out->push_back(c);
    }
  }
  return true;
}

std::string EncodeSegment(std::string_view in) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (char c : in) {
    unsigned char u = static_cast<unsigned char>(c);
    if (std::isalnum(u) || c == '-' || c == '.' || c == '_' || c == '~') {
      out.push_back(c);
    } else {
      out.push_back('%');
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 15]);
    }
  }
  return out;
}

const char* Reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
  }
  return "Error";
}

std::string FormatHead(const Response& r, bool keep_alive) {
  std::string h;
  h.reserve(160 + r.headers.size() * 48);
  h += "HTTP/1.1 ";
  h += std::to_string(r.status);
  h += ' ';
  h += Reason(r.status);
  h += "\r\nContent-Type: ";
  h += r.content_type;
  h += "\r\nContent-Length: ";
  h += std::to_string(r.body.size());
  h += keep_alive ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n";
  for (const auto& kv : r.headers) {
    h += kv.first;
    h += ": ";
    h += kv.second;
    h += "\r\n";
  }
  h += "\r\n";
  return h;
}

bool ParseResponseHead(std::string_view head, ResponseHead* out) {
  size_t pos = 0;
  std::string_view line;
  if (!NextLine(head, &pos, &line)) return false;
  if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || line[8] != ' ') return false;
  int code = 0;
  for (size_t k = 9; k < 12; ++k) {
    if (line[k] < '0' || line[k] > '9') return false;
    code = code * 10 + (line[k] - '0');
  }
  out->status = code;
  out->close = line[7] == '0';
  while (NextLine(head, &pos, &line) && !line.empty()) {
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return false;
    std::string name = Lower(line.substr(0, colon));
    std::string value(Trim(line.substr(colon + 1)));
    if (name == "content-length") {
      if (value.empty() || value.size() > 15 || value.find_first_not_of("0123456789") != std::string::npos) return false;
      out->has_length = true;
      out->content_length = size_t(std::strtoull(value.c_str(), nullptr, 10));
    } else if (name == "connection") {
      out->close = HasToken(value, "close");
    } else if (name == "transfer-encoding") {
      return false;  // our service never sends it; a peer that does is not ours
    }
  }
  return true;
}

}  // namespace http
}  // namespace tvmbundle
