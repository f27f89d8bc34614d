// The long-running HTTP/1.1 inference service (`tvm-deploy serve`).
#ifndef TVMBUNDLE_SERVE_H_
#define TVMBUNDLE_SERVE_H_

#include <string>
#include <vector>

#include "model.h"

namespace tvmbundle {

struct RequestHead {
  std::string method, target;
  bool keep_alive = true;
  bool has_length = false;
  bool chunked = false;
  size_t content_length = 0;
};

// Parses a request line and headers ending in the blank line; false with *problem on bad input.
bool ParseRequestHead(const std::string& head, RequestHead* out, std::string* problem);

std::string InfoJson(const Bundle& b);
// The bundle's selftest without printing: false and *why on a mismatch.
bool RunSelftestQuiet(const Bundle& b, Model& model, std::string* why);
int Serve(const Bundle& b, const std::vector<std::string>& args);
// GET /healthz of a running service (default: the manifest's address); exit 0 when it answers 200.
int Probe(const Bundle& b, const std::vector<std::string>& args);

}  // namespace tvmbundle

#endif  // TVMBUNDLE_SERVE_H_
