// `tvm-deploy serve`: a small HTTP/1.1 inference service.
//
// No HTTP library: the ones that cross-compile cleanly are header-only giants, and
// the service needs three routes, Content-Length bodies and keep-alive. The request
// head parser is a pure function (ParseRequestHead) so tests can fuzz it, and every
// limit (head size, body size, connections) is explicit.
#include "serve.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

namespace tvmbundle {
namespace {

constexpr size_t kMaxHead = 16 * 1024;
constexpr int kIdleTimeoutSeconds = 30;

std::atomic<bool> g_ready{false};
std::atomic<bool> g_stopping{false};

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::string JsonError(const std::string& msg) {
  std::string out = "{\"error\": \"";
  for (char c : msg) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    out += c;
  }
  return out + "\"}\n";
}

bool SendAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += size_t(n);
  }
  return true;
}

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
};

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
  }
  return "Error";
}

Response Error(int status, const std::string& msg) {
  Response r;
  r.status = status;
  r.body = JsonError(msg);
  return r;
}

bool WriteResponse(int fd, const Response& r, bool keep_alive) {
  std::ostringstream head;
  head << "HTTP/1.1 " << r.status << " " << Reason(r.status) << "\r\n"
       << "Content-Type: " << r.content_type << "\r\n"
       << "Content-Length: " << r.body.size() << "\r\n"
       << "Connection: " << (keep_alive ? "keep-alive" : "close") << "\r\n";
  for (const auto& h : r.headers) head << h.first << ": " << h.second << "\r\n";
  head << "\r\n";
  return SendAll(fd, head.str()) && SendAll(fd, r.body);
}

// Bounds the number of connections served at once; past it a client gets 503 at once
// instead of waiting in a queue that would only grow under overload.
class Slots {
 public:
  explicit Slots(int n) : free_(n) {}
  bool TryAcquire() {
    std::lock_guard<std::mutex> l(mu_);
    if (free_ == 0) return false;
    --free_;
    return true;
  }
  void Release() {
    std::lock_guard<std::mutex> l(mu_);
    ++free_;
    cv_.notify_all();
  }
  void WaitAllFree(int n) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::seconds(10), [&] { return free_ == n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int free_;
};

struct Server {
  const Bundle& bundle;
  std::unique_ptr<Model> model;
  size_t max_body = 0;
  std::string info_json;
};

Response Handle(Server& s, const RequestHead& req, const std::string& body) {
  std::string path = req.target.substr(0, req.target.find('?'));
  if (path == "/healthz") {
    if (req.method != "GET" && req.method != "HEAD") return Error(405, "use GET");
    if (!g_ready) return Error(503, "starting: loading the model and running its selftest");
    Response r;
    r.content_type = "text/plain";
    r.body = "ok\n";
    return r;
  }
  if (path == "/v1/info") {
    if (req.method != "GET") return Error(405, "use GET");
    Response r;
    r.body = s.info_json + "\n";
    return r;
  }
  if (path == "/v1/infer") {
    if (req.method != "POST") return Error(405, "use POST with the inputs as .npy arrays");
    if (!g_ready) return Error(503, "starting: loading the model and running its selftest");
    std::vector<NpyArray> inputs;
    size_t off = 0;
    try {
      while (off < body.size()) {
        size_t used = 0;
        inputs.push_back(ParseNpy(reinterpret_cast<const uint8_t*>(body.data()) + off, body.size() - off, &used,
                                  "body array " + std::to_string(inputs.size())));
        off += used;
      }
      std::vector<NpyArray> outs = s.model->Run(inputs);
      Response r;
      r.content_type = "application/x-npy";
      std::string names;
      for (size_t i = 0; i < outs.size(); ++i) {
        r.body += SerializeNpy(outs[i].dtype, outs[i].shape, outs[i].data.data(), outs[i].data.size());
        names += (i ? "," : "") + s.bundle.outputs[i].name;
      }
      r.headers.emplace_back("X-Tvmbundle-Outputs", names);
      return r;
    } catch (const InputError& e) {
      return Error(400, e.what());
    } catch (const std::exception& e) {
      return Error(500, e.what());
    }
  }
  return Error(404, "no such path; try /healthz, /v1/info or POST /v1/infer");
}

void ServeConnection(Server& s, int fd) {
  timeval tv{kIdleTimeoutSeconds, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  std::string buf;
  char chunk[65536];
  while (!g_stopping) {
    // Read the head.
    size_t end;
    while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
      if (buf.size() > kMaxHead) {
        WriteResponse(fd, Error(431, "request head larger than 16 KiB"), false);
        return;
      }
      ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;  // closed, timed out or reset: nothing to answer
      buf.append(chunk, size_t(n));
    }
    if (end > kMaxHead) {
      WriteResponse(fd, Error(431, "request head larger than 16 KiB"), false);
      return;
    }
    RequestHead req;
    std::string problem;
    if (!ParseRequestHead(buf.substr(0, end + 4), &req, &problem)) {
      WriteResponse(fd, Error(problem.rfind("HTTP version", 0) == 0 ? 505 : 400, problem), false);
      return;
    }
    buf.erase(0, end + 4);
    if (req.chunked) {
      WriteResponse(fd, Error(501, "chunked request bodies are not supported; send Content-Length"), false);
      return;
    }
    if (req.method == "POST" && !req.has_length) {
      WriteResponse(fd, Error(411, "POST needs a Content-Length"), false);
      return;
    }
    if (req.content_length > s.max_body) {
      WriteResponse(fd, Error(413, "body of " + std::to_string(req.content_length) + " bytes; at most " +
                                       std::to_string(s.max_body) + " are accepted"), false);
      return;
    }
    while (buf.size() < req.content_length) {
      ssize_t n = recv(fd, chunk, std::min(sizeof(chunk), req.content_length - buf.size()), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;
      buf.append(chunk, size_t(n));
    }
    std::string body = buf.substr(0, req.content_length);
    buf.erase(0, req.content_length);
    Response r = Handle(s, req, body);
    if (req.method == "HEAD") r.body.clear();
    bool keep = req.keep_alive && !g_stopping;
    if (!WriteResponse(fd, r, keep) || !keep) return;
  }
}

int Listen(const std::string& listen, std::string* err) {
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    *err = "--listen: expected HOST:PORT, got '" + listen + "'";
    return -1;
  }
  std::string host = listen.substr(0, colon), port = listen.substr(colon + 1);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    *err = "--listen " + listen + ": " + gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 128) == 0) break;
    *err = "--listen " + listen + ": " + std::strerror(errno);
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

}  // namespace

// The address when none is given: TVM_DEPLOY_LISTEN, else the manifest's service.listen.
std::string DefaultListen(const Bundle& b) {
  const char* env = std::getenv("TVM_DEPLOY_LISTEN");
  if (env && *env) return env;
  return b.listen.empty() ? "127.0.0.1:8470" : b.listen;
}

int Probe(const Bundle& b, const std::vector<std::string>& args) {
  std::string listen = DefaultListen(b);
  int timeout = 5;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--timeout" && i + 1 < args.size()) timeout = std::max(1, std::atoi(args[++i].c_str()));
    else if (args[i].rfind("--", 0) != 0) listen = args[i];
    else {
      std::cerr << "tvm-deploy: probe: unknown argument '" << args[i] << "'\n";
      return 2;
    }
  }
  size_t colon = listen.rfind(':');
  std::string host = colon == std::string::npos ? listen : listen.substr(0, colon);
  std::string port = colon == std::string::npos ? "8470" : listen.substr(colon + 1);
  if (host == "0.0.0.0" || host.empty()) host = "127.0.0.1";
  if (host == "::" || host == "[::]") host = "::1";
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
    std::cerr << "tvm-deploy: probe: cannot resolve " << listen << "\n";
    return 1;
  }
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval tv{timeout, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  int rc = connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc != 0) {
    std::cerr << "tvm-deploy: probe: " << listen << ": " << std::strerror(errno) << "\n";
    close(fd);
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  // Healthy, and it is this bundle that answers: a deploy's health gate must not be
  // satisfied by an old process still holding the address.
  SendAll(fd, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /v1/info HTTP/1.1\r\nHost: localhost\r\n"
              "Connection: close\r\n\r\n");
  std::string reply;
  char buf[4096];
  ssize_t n;
  while (reply.size() < 65536 && (n = recv(fd, buf, sizeof(buf), 0)) > 0) reply.append(buf, size_t(n));
  close(fd);
  std::string line = reply.substr(0, reply.find("\r\n"));
  if (line.rfind("HTTP/1.1 200", 0) != 0) {
    std::cerr << "tvm-deploy: probe: " << listen << ": " << (line.empty() ? "no answer" : line) << "\n";
    return 1;
  }
  if (reply.find("\"bundle_id\": \"" + b.bundle_id + "\"") == std::string::npos) {
    std::cerr << "tvm-deploy: probe: " << listen << ": healthy, but another bundle answers (not "
              << b.bundle_id.substr(0, 12) << ")\n";
    return 1;
  }
  std::cout << "healthy\n";
  return 0;
}

bool ParseRequestHead(const std::string& head, RequestHead* out, std::string* problem) {
  size_t eol = head.find("\r\n");
  if (eol == std::string::npos) {
    *problem = "malformed request line";
    return false;
  }
  std::string line = head.substr(0, eol);
  size_t sp1 = line.find(' '), sp2 = line.rfind(' ');
  if (sp1 == std::string::npos || sp2 == sp1 || sp1 == 0) {
    *problem = "malformed request line";
    return false;
  }
  out->method = line.substr(0, sp1);
  out->target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  std::string version = line.substr(sp2 + 1);
  for (char c : out->method) {
    if (c < 'A' || c > 'Z') {
      *problem = "malformed method";
      return false;
    }
  }
  if (out->target.empty() || out->target[0] != '/' || out->target.find(' ') != std::string::npos) {
    *problem = "malformed request target";
    return false;
  }
  if (version == "HTTP/1.1") {
    out->keep_alive = true;
  } else if (version == "HTTP/1.0") {
    out->keep_alive = false;
  } else {
    *problem = "HTTP version '" + version.substr(0, 20) + "' is not supported; use HTTP/1.1";
    return false;
  }
  size_t pos = eol + 2;
  while (pos < head.size()) {
    size_t next = head.find("\r\n", pos);
    if (next == std::string::npos) {
      *problem = "malformed header line";
      return false;
    }
    if (next == pos) break;  // the blank line
    std::string h = head.substr(pos, next - pos);
    pos = next + 2;
    size_t colon = h.find(':');
    if (colon == std::string::npos || colon == 0 || h[0] == ' ' || h[0] == '\t') {
      *problem = "malformed header line";
      return false;
    }
    std::string name = Lower(h.substr(0, colon)), value = Trim(h.substr(colon + 1));
    if (name == "content-length") {
      if (out->has_length || value.empty() || value.size() > 15 ||
          value.find_first_not_of("0123456789") != std::string::npos) {
        *problem = "bad Content-Length";
        return false;
      }
      out->has_length = true;
      out->content_length = size_t(std::stoull(value));
    } else if (name == "transfer-encoding") {
      out->chunked = true;
    } else if (name == "connection") {
      std::string v = Lower(value);
      if (v == "close") out->keep_alive = false;
      if (v == "keep-alive") out->keep_alive = true;
    }
  }
  return true;
}

int Serve(const Bundle& b, const std::vector<std::string>& args) {
  std::string listen = DefaultListen(b);
  int max_connections = 16;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--listen" && i + 1 < args.size()) {
      listen = args[++i];
    } else if (args[i] == "--max-connections" && i + 1 < args.size()) {
      max_connections = std::max(1, std::atoi(args[++i].c_str()));
    } else {
      std::cerr << "tvm-deploy: serve: unknown argument '" << args[i] << "'\n";
      return 2;
    }
  }
  // Signals are taken by one thread with sigwait, so no handler runs inside TVM or a syscall.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::string err;
  int fd = Listen(listen, &err);
  if (fd < 0) {
    std::cerr << "tvm-deploy: serve: " << err << "\n";
    return 3;
  }
  Server server{b, nullptr, 0, InfoJson(b)};
  size_t input_bytes = 0;
  for (const auto& s : b.inputs) input_bytes += s.Bytes();
  // The inputs plus .npy headers; anything far larger is not an inference request.
  server.max_body = input_bytes + 4096 * (b.inputs.size() + 1);

  std::thread stopper([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    g_stopping = true;
    shutdown(fd, SHUT_RDWR);
  });
  std::cerr << "tvm-deploy: serving " << b.name << " (" << b.bundle_id.substr(0, 12) << ") on " << listen << "\n";

  Slots slots(max_connections);
  std::thread loader([&] {
    try {
      server.model = std::make_unique<Model>(b);
      std::string why;
      if (!RunSelftestQuiet(b, *server.model, &why)) {
        std::cerr << "tvm-deploy: serve: selftest failed, not serving: " << why << "\n";
        std::exit(1);
      }
      g_ready = true;
      std::cerr << "tvm-deploy: ready\n";
    } catch (const std::exception& e) {
      std::cerr << "tvm-deploy: serve: " << e.what() << "\n";
      std::exit(3);
    }
  });
  loader.detach();

  while (!g_stopping) {
    int conn = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (conn < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (g_stopping) break;
      if (errno == EMFILE || errno == ENFILE) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      break;
    }
    if (!slots.TryAcquire()) {
      WriteResponse(conn, Error(503, "too many connections"), false);
      close(conn);
      continue;
    }
    std::thread([&server, &slots, conn] {
      ServeConnection(server, conn);
      close(conn);
      slots.Release();
    }).detach();
  }
  close(fd);
  slots.WaitAllFree(max_connections);
  if (stopper.joinable()) {
    // The stopper only returns after a signal; when accept failed for another reason, wake it.
    if (!g_stopping) kill(getpid(), SIGTERM);
    stopper.join();
  }
  std::cerr << "tvm-deploy: stopped\n";
  return 0;
}

}  // namespace tvmbundle
