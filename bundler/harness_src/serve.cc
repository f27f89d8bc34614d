#include "serve.h"

#include <iostream>

namespace tvmbundle {

int Serve(const Bundle&, const std::vector<std::string>&) {
  std::cerr << "tvm-deploy: serve is not available in this build\n";
  return 3;
}

}  // namespace tvmbundle
