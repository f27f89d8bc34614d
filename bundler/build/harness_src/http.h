// HTTP/1.1 message framing for `tvm-deploy serve` and `probe`: pure functions over byte
// buffers (no sockets), so the service's loop stays small and tests can fuzz the parser.
// Line endings: CRLF, and bare LF as RFC 9112 section 2.2 allows a recipient to accept.
#ifndef TVMBUNDLE_HTTP_H_
#define TVMBUNDLE_HTTP_H_

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tvmbundle {
namespace http {

constexpr size_t kMaxHead = 16 * 1024;  // request line and headers; past it: 431

struct RequestHead {
  std::string method, target;
  std::string path;   // target up to '?', not yet percent-decoded
  int minor = 1;      // HTTP/1.<minor>
  bool keep_alive = true;
  bool has_length = false;
  bool chunked = false;          // any Transfer-Encoding (not supported: 501)
  bool expect_continue = false;  // Expect: 100-continue
  size_t content_length = 0;
  std::vector<std::pair<std::string, std::string>> headers;  // names lowercased, in order

  // The value of the first header with this (lowercase) name, or nullptr.
  const std::string* Header(std::string_view lower_name) const;
};

// The offset just past the blank line that ends a head starting at buf[0] (CRLF or LF endings),
// or npos. `*scanned` is where the next call may resume searching (the buffer only grows).
size_t FindHeadEnd(std::string_view buf, size_t* scanned);

// Parses a request line and headers ending in the blank line. False with *status (400, 505)
// and *problem on bad input.
bool ParseRequestHead(std::string_view head, RequestHead* out, int* status, std::string* problem);

// Percent-decodes one path segment; false on a malformed escape or a decoded '/' or NUL.
bool DecodeSegment(std::string_view in, std::string* out);
// Percent-encodes everything but RFC 3986 unreserved characters.
std::string EncodeSegment(std::string_view in);

const char* Reason(int status);

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
  bool close = false;  // answer with Connection: close and end the connection
};

// Status line and headers, ending in the blank line. HEAD answers keep Content-Length but send no body.
std::string FormatHead(const Response& r, bool keep_alive);

// A response as a client reads it (for `probe`).
struct ResponseHead {
  int status = 0;
  size_t content_length = 0;
  bool has_length = false;
  bool close = false;
};
bool ParseResponseHead(std::string_view head, ResponseHead* out);

}  // namespace http
}  // namespace tvmbundle

#endif  // TVMBUNDLE_HTTP_H_
