// The long-running HTTP/1.1 inference service (`tvm-deploy serve`).
#ifndef TVMBUNDLE_SERVE_H_
#define TVMBUNDLE_SERVE_H_

#include <string>
#include <vector>

#include "model.h"

namespace tvmbundle {

std::string InfoJson(const Bundle& b);
int Serve(const Bundle& b, const std::vector<std::string>& args);

}  // namespace tvmbundle

#endif  // TVMBUNDLE_SERVE_H_
