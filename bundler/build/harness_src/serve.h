// The long-running inference service (`tvm-deploy serve`, Open Inference Protocol v2 over
// HTTP/1.1) and its health check (`tvm-deploy probe`).
#ifndef TVMBUNDLE_SERVE_H_
#define TVMBUNDLE_SERVE_H_

#include <string>
#include <vector>

#include "http.h"
#include "model.h"

namespace tvmbundle {

// Defined in main.cc.
std::string InfoJson(const Bundle& b);
const char* HarnessVersion();
// The bundle's selftest without printing: false and *why on a mismatch.
bool RunSelftestQuiet(const Bundle& b, Model& model, std::string* why);

int Serve(const Bundle& b, const std::vector<std::string>& args);
// Exit 0 when the service there is ready (GET /v2/health/ready) and serves this bundle's model
// at this bundle's version (GET /v2/models/NAME); 1 otherwise, with the reason on stderr.
int Probe(const Bundle& b, const std::vector<std::string>& args);

}  // namespace tvmbundle

#endif  // TVMBUNDLE_SERVE_H_
