// `tvm-deploy rpc`: TVM's RPC server, on the board, from the runtime the bundle ships.
//
// The wire protocol is TVM's (python/tvm/rpc/server.py): a client connects, sends
// [RPC_MAGIC, len, "client:KEY [-timeout=S]"], gets [RPC_CODE_SUCCESS, len, "server:KEY"], and
// the socket is handed to the runtime's `rpc.ServerLoop`. Each session runs in a forked child
// with its own work folder (removed afterwards), so a kernel that crashes ends one measurement,
// not the server. With --tracker the server registers with a TVM RPC tracker under KEY and
// re-registers after every session, as TVM's own server does.
//
// The runtime provides tvm.rpc.server.upload/download/remove/ServerLoop; a server must provide
// tvm.rpc.server.workpath and tvm.rpc.server.load_module (and MetaSchedule's runner calls
// tvm.contrib.random.random_fill_for_measure to make inputs), which are defined here.
//
// Security: whoever reaches the port can run code as this user. Listen on 127.0.0.1 (the
// default) and reach it through an SSH tunnel, as tvmbundle does.
#include "rpc.h"

#include "device.h"

#include <arpa/inet.h>
#include <ftw.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace tvmbundle {
namespace {

namespace ffi = tvm::ffi;
namespace json = tvm::ffi::json;

constexpr int32_t kRpcMagic = 0xFF271;
constexpr int32_t kTrackerMagic = 0x2F271;
constexpr int32_t kCodeSuccess = kRpcMagic + 0;
constexpr int32_t kCodeMismatch = kRpcMagic + 2;
// TrackerCode (python/tvm/rpc/base.py)
constexpr int kTrackerSuccess = 0, kTrackerPut = 3, kTrackerUpdateInfo = 5, kTrackerPendingKeys = 7;

struct Options {
  std::string host = "127.0.0.1";
  int port = 9090;
  int port_end = 0;  // try ports [port, port_end) until one is free; 0: only port
  std::string key = "tvmbundle";
  std::string tracker;      // HOST:PORT
  std::string custom_addr;  // the address the tracker hands to clients (default: what it sees)
  std::string work_dir;     // where session folders go (default $TMPDIR or /tmp)
  int sessions = 0;         // stop after N sessions; 0: serve until killed
  double session_timeout = 0;
};

[[noreturn]] void Fail(const std::string& what) { throw std::runtime_error(what); }

void Log(const std::string& line) { std::cerr << "tvm-deploy rpc: " << line << std::endl; }

std::pair<std::string, int> SplitHostPort(const std::string& flag, const std::string& v) {
  size_t colon = v.rfind(':');
  if (colon == std::string::npos || colon == 0) throw std::invalid_argument(flag + ": expected HOST:PORT, got '" + v + "'");
  return {v.substr(0, colon), ParseInt(flag, v.substr(colon + 1), 1, 65535)};
}

// ---- sockets --------------------------------------------------------------------------------

void SendAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) Fail(std::string("send: ") + std::strerror(errno));
    p += k;
    n -= size_t(k);
  }
}

void RecvAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k == 0) Fail("peer closed the connection");
    if (k < 0) Fail(std::string("recv: ") + std::strerror(errno));
    p += k;
    n -= size_t(k);
  }
}

void SendInt(int fd, int32_t v) { SendAll(fd, &v, 4); }  // little-endian on every board we support
int32_t RecvInt(int fd) {
  int32_t v;
  RecvAll(fd, &v, 4);
  return v;
}
void SendStr(int fd, const std::string& s) {
  SendInt(fd, int32_t(s.size()));
  SendAll(fd, s.data(), s.size());
}
std::string RecvStr(int fd, size_t limit = 1 << 20) {
  int32_t n = RecvInt(fd);
  if (n < 0 || size_t(n) > limit) Fail("bad length " + std::to_string(n));
  std::string s(size_t(n), '\0');
  RecvAll(fd, s.data(), s.size());
  return s;
}

int Connect(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) {
    Fail("cannot resolve " + host);
  }
  int fd = -1;
  for (addrinfo* a = res; a; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd >= 0 && ::connect(fd, a->ai_addr, a->ai_addrlen) == 0) break;
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) Fail("cannot connect to " + host + ":" + std::to_string(port) + ": " + std::strerror(errno));
  return fd;
}

int Listen(const std::string& host, int port, int port_end, int* bound) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || !res) Fail("cannot resolve " + host);
  int fd = ::socket(res->ai_family, SOCK_STREAM, 0);
  if (fd < 0) Fail(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  int last = port_end > port ? port_end : port + 1;
  int err = 0;
  for (int p = port; p < last; ++p) {
    sockaddr_storage addr{};
    std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
    if (addr.ss_family == AF_INET) reinterpret_cast<sockaddr_in*>(&addr)->sin_port = htons(uint16_t(p));
    else reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port = htons(uint16_t(p));
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), res->ai_addrlen) == 0) {
      sockaddr_storage got{};
      socklen_t len = sizeof(got);
      getsockname(fd, reinterpret_cast<sockaddr*>(&got), &len);
      *bound = ntohs(got.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&got)->sin_port
                                              : reinterpret_cast<sockaddr_in6*>(&got)->sin6_port);
      freeaddrinfo(res);
      if (::listen(fd, 4) != 0) Fail(std::string("listen: ") + std::strerror(errno));
      return fd;
    }
    err = errno;
  }
  freeaddrinfo(res);
  Fail("cannot bind " + host + " port " + std::to_string(port) + (last > port + 1 ? "-" + std::to_string(last - 1) : "") +
       ": " + std::strerror(err));
}

std::string PeerName(int fd) {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  char buf[INET6_ADDRSTRLEN] = "?";
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    if (a.ss_family == AF_INET) inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&a)->sin_addr, buf, sizeof(buf));
    else inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&a)->sin6_addr, buf, sizeof(buf));
  }
  return buf;
}

// ---- the tracker ----------------------------------------------------------------------------

class Tracker {
 public:
  Tracker(const std::string& addr, const Options& o, int port) : opts_(o), port_(port) {
    auto hp = SplitHostPort("--tracker", addr);
    fd_ = Connect(hp.first, hp.second);
    SendInt(fd_, kTrackerMagic);
    if (RecvInt(fd_) != kTrackerMagic) Fail(addr + " is not a TVM RPC tracker");
    json::Array where{CustomAddr(), int64_t(port_)};
    json::Object info{{"key", ffi::String("server:" + o.key)}, {"addr", where}};
    Call(json::Array{int64_t(kTrackerUpdateInfo), info});
  }
  ~Tracker() {
    if (fd_ >= 0) ::close(fd_);
  }
  // Offer this server under a fresh match key; returns the key clients will present.
  std::string Put() {
    static std::mt19937_64 rng{std::random_device{}()};
    matchkey_ = opts_.key + ":" + std::to_string(rng() % 1000000000ULL);
    json::Array value{int64_t(port_), ffi::String(matchkey_)};
    Call(json::Array{int64_t(kTrackerPut), ffi::String(opts_.key), value, CustomAddr()});
    return matchkey_;
  }
  // Whether a client took our match key from the tracker and has yet to connect.
  bool Pending() {
    SendStr(fd_, std::string(json::Stringify(json::Array{int64_t(kTrackerPendingKeys)})));
    json::Value v = json::Parse(ffi::String(RecvStr(fd_)));
    if (auto arr = v.try_cast<json::Array>()) {
      for (const ffi::Any& k : *arr) {
        if (auto s = k.try_cast<ffi::String>(); s && std::string(*s) == matchkey_) return true;
      }
    }
    return false;
  }

 private:
  json::Value CustomAddr() const {
    return opts_.custom_addr.empty() ? json::Value(nullptr) : json::Value(ffi::String(opts_.custom_addr));
  }
  void Call(const json::Value& msg) {
    SendStr(fd_, std::string(json::Stringify(msg)));
    json::Value v = json::Parse(ffi::String(RecvStr(fd_)));
    auto code = v.try_cast<int64_t>();
    if (!code || *code != kTrackerSuccess) Fail("the tracker refused " + std::string(json::Stringify(msg)));
  }

  const Options& opts_;
  int port_;
  int fd_ = -1;
  std::string matchkey_;
};

// ---- one session ----------------------------------------------------------------------------

std::string g_workdir;

std::string WorkPath(const std::string& name) {
  if (name.find("..") != std::string::npos || (!name.empty() && name[0] == '/')) {
    Fail("refusing path '" + name + "' outside the session folder");
  }
  return g_workdir + "/" + name;
}

void RegisterServerFunctions() {
  ffi::Function::SetGlobal("tvm.rpc.server.workpath",
                           ffi::Function::FromTyped([](ffi::String name) -> ffi::String {
                             return ffi::String(WorkPath(std::string(name)));
                           }),
                           true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module",
                           ffi::Function::FromTyped([](ffi::String name) -> ffi::Module {
                             std::string path = WorkPath(std::string(name));
                             if (path.size() < 3 || path.compare(path.size() - 3, 3, ".so") != 0) {
                               Fail("load_module " + std::string(name) +
                                    ": only shared libraries (.so) can be loaded; the board has no linker");
                             }
                             return ffi::Module::LoadFromFile(ffi::String(path));
                           }),
                           true);
  // What MetaSchedule's runner fills its measurement inputs with.
  ffi::Function::SetGlobal(
      "tvm.contrib.random.random_fill_for_measure",
      ffi::Function::FromPacked([](ffi::PackedArgs args, ffi::Any*) {
        DLTensor* t = args[0].cast<DLTensor*>();
        static std::mt19937 rng{42};
        int64_t n = 1;
        for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
        char* base = static_cast<char*>(t->data) + t->byte_offset;
        std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
        if (t->dtype.code == kDLFloat && t->dtype.bits == 32) {
          for (int64_t i = 0; i < n; ++i) reinterpret_cast<float*>(base)[i] = uni(rng);
        } else if (t->dtype.code == kDLFloat && t->dtype.bits == 64) {
          for (int64_t i = 0; i < n; ++i) reinterpret_cast<double*>(base)[i] = uni(rng);
        } else {
          // Integers (often indices) and other types: zero, which is in range for any index.
          std::memset(base, 0, size_t(n) * ((t->dtype.bits * t->dtype.lanes + 7) / 8));
        }
      }),
      true);
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

void ServeSession(int conn, const Options& o) {
  std::string base = o.work_dir.empty() ? (std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") : o.work_dir;
  std::string tmpl = base + "/tvm-deploy-rpc.XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) Fail("cannot create a session folder in " + base + ": " + std::strerror(errno));
  g_workdir = buf.data();
  RegisterServerFunctions();
  int code = 0;
  try {
    ffi::Function::GetGlobalRequired("rpc.ServerLoop")(int64_t(conn));
  } catch (const std::exception& e) {
    Log(std::string("session ended with an error: ") + e.what());
    code = 3;
  }
  nftw(g_workdir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
  std::cout.flush();
  _exit(code);
}

// Read the client's greeting; true (and the client's options) when it presented our key.
bool Handshake(int conn, const std::string& matchkey, const std::string& key, double* timeout) {
  if (RecvInt(conn) != kRpcMagic) return false;
  std::string client = RecvStr(conn, 4096);
  std::vector<std::string> words;
  size_t start = 0;
  while (start <= client.size()) {
    size_t sp = client.find(' ', start);
    if (sp == std::string::npos) sp = client.size();
    if (sp > start) words.push_back(client.substr(start, sp - start));
    start = sp + 1;
  }
  if (words.empty() || words[0] != "client:" + matchkey) {
    SendInt(conn, kCodeMismatch);
    return false;
  }
  for (size_t i = 1; i < words.size(); ++i) {
    if (words[i].rfind("-timeout=", 0) == 0) *timeout = std::atof(words[i].c_str() + 9);
  }
  SendInt(conn, kCodeSuccess);
  SendStr(conn, "server:" + key);
  return true;
}

// Wait for the session's child; kill it after `timeout` seconds (0: no limit).
void Reap(pid_t child, double timeout) {
  auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    int status = 0;
    pid_t r = waitpid(child, &status, timeout > 0 ? WNOHANG : 0);
    if (r == child) {
      if (WIFSIGNALED(status)) Log("session ended by signal " + std::to_string(WTERMSIG(status)));
      return;
    }
    if (r < 0 && errno != EINTR) return;
    if (timeout > 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout) {
      Log("session timed out after " + std::to_string(int(timeout)) + " s; ending it");
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Options ParseOptions(const std::vector<std::string>& args) {
  Options o;
  std::string port, port_end, sessions, session_timeout;
  ArgParser("rpc", args).Option("--host", &o.host).Option("--port", &port).Option("--port-end", &port_end)
      .Option("--key", &o.key).Option("--tracker", &o.tracker).Option("--custom-addr", &o.custom_addr)
      .Option("--work-dir", &o.work_dir).Option("--sessions", &sessions).Option("--session-timeout", &session_timeout)
      .Parse();
  if (!port.empty()) o.port = ParseInt("--port", port, 0, 65535);
  if (!port_end.empty()) o.port_end = ParseInt("--port-end", port_end, 1, 65536);
  if (!sessions.empty()) o.sessions = ParseInt("--sessions", sessions, 0, 1 << 30);
  if (!session_timeout.empty()) o.session_timeout = ParseInt("--session-timeout", session_timeout, 0, 1 << 30);
  if (o.key.empty() || o.key.find(' ') != std::string::npos) throw std::invalid_argument("--key: expected a word without spaces");
  if (!o.tracker.empty()) SplitHostPort("--tracker", o.tracker);
  return o;
}

}  // namespace

int RpcServe(const std::vector<std::string>& args) {
  Options o = ParseOptions(args);
  signal(SIGPIPE, SIG_IGN);
  int port = 0;
  int lfd = Listen(o.host, o.port, o.port_end, &port);
  // The one line on stdout: tvmbundle reads the port from it (--port 0 picks a free one).
  std::cout << "listening on " << o.host << ":" << port << " key " << o.key << std::endl;
  std::unique_ptr<Tracker> tracker;
  int served = 0;
  const double ping_period = 2.0, unmatched_limit = 6.0;
  while (o.sessions == 0 || served < o.sessions) {
    if (!o.tracker.empty() && !tracker) tracker = std::make_unique<Tracker>(o.tracker, o, port);
    std::string matchkey = tracker ? tracker->Put() : o.key;
    double unmatched = 0;
    int conn = -1;
    while (conn < 0) {
      pollfd p{lfd, POLLIN, 0};
      int r = ::poll(&p, 1, tracker ? int(ping_period * 1000) : -1);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) {
        // A client may have taken our key from the tracker and never come: offer a new one.
        unmatched = tracker->Pending() ? 0 : unmatched + ping_period;
        if (unmatched > unmatched_limit) {
          matchkey = tracker->Put();
          unmatched = 0;
        }
        continue;
      }
      conn = ::accept(lfd, nullptr, nullptr);
    }
    int one = 1;
    setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    double timeout = o.session_timeout;
    bool ok = false;
    try {
      ok = Handshake(conn, matchkey, o.key, &timeout);
    } catch (const std::exception& e) {
      Log(std::string("bad greeting: ") + e.what());
    }
    if (!ok) {
      Log("refused a connection from " + PeerName(conn) + " (wrong magic or key)");
      ::close(conn);
      continue;
    }
    Log("session from " + PeerName(conn));
    pid_t child = fork();
    if (child < 0) Fail(std::string("fork: ") + std::strerror(errno));
    if (child == 0) {
      ::close(lfd);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      tracker.release();  // the parent's connection: leave it alone in the child
      ServeSession(conn, o);
    }
    ::close(conn);
    Reap(child, timeout);
    ++served;
  }
  return 0;
}

}  // namespace tvmbundle
