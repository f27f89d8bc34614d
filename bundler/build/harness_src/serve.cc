// `tvm-deploy serve`: the bundle's model behind the Open Inference Protocol v2 (KServe / Triton
// HTTP/REST, with the binary tensor data extension), Prometheus metrics, and `probe`.
//
// HTTP: our own small parser (http.{h,cc}), not cpp-httplib. The library is header-only and
// cross-builds, but its thread-per-connection pool with per-read timeouts is what lets slow
// clients hold every slot; the guarantees below need control of the socket loop, and the
// parser stays a pure function that tests/test_serve.py fuzzes.
//
// Threads (all joined before Serve returns):
//   - this thread: one epoll loop owns every socket (non-blocking). It parses requests, answers
//     health, metadata and /metrics itself, so those never wait behind inference, and enforces
//     one deadline for a whole request head and body (not per read), an idle timeout for
//     keep-alive connections, and a cap on connections (idle ones are dropped first when a new
//     client needs the slot; a client trickling a request is dropped next).
//   - the model thread: loads the model, runs the selftest (ready only after it passed; a
//     failing selftest exits 1), then takes inference requests from a bounded queue (full: 503
//     with Retry-After). TVM's thread pool is per calling thread, so one thread calls the model.
//   - the signal thread: sigwait for SIGTERM/SIGINT. Shutdown stops accepting, finishes the
//     requests under way and waits no longer than the idle timeout.
#include "serve.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "device.h"
#include "json.h"
#include "npy.h"
#include "v2.h"

namespace tvmbundle {
namespace {

using Clock = std::chrono::steady_clock;
using http::Response;

std::string ErrorBody(const std::string& msg) {
  json::Writer w(json::Writer::kCompact);
  w.BeginObject().Key("error").String(msg).EndObject();
  return w.Take();
}

Response Error(int status, const std::string& msg) {
  Response r;
  r.status = status;
  r.body = ErrorBody(msg);
  return r;
}

Response Json(std::string body, int status = 200) {
  Response r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---- metrics ---------------------------------------------------------------------------------

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void Observe(double v) {
    size_t k = 0;
    while (k < bounds_.size() && v > bounds_[k]) ++k;
    ++counts_[k];
    sum_ += v;
    ++count_;
  }
  void Render(std::string* out, const std::string& name, const std::string& labels) const {
    uint64_t cum = 0;
    for (size_t k = 0; k <= bounds_.size(); ++k) {
      cum += counts_[k];
      std::string le;
      if (k == bounds_.size()) {
        le = "+Inf";
      } else {
        json::Writer w;
        w.Double(bounds_[k]);
        le = w.str();
      }
      *out += name + "_bucket{" + labels + ",le=\"" + le + "\"} " + std::to_string(cum) + "\n";
    }
    json::Writer s;
    s.Double(sum_);
    *out += name + "_sum{" + labels + "} " + s.str() + "\n";
    *out += name + "_count{" + labels + "} " + std::to_string(count_) + "\n";
  }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
  uint64_t count_ = 0;
};

std::string LabelValue(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::vector<double> LatencyBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

struct Gauges {
  bool ready = false;
  int selftest = -1;  // -1 not run yet, 0 failed, 1 passed
  double load_seconds = -1;
  size_t queue_length = 0, queue_capacity = 0, in_flight = 0, connections = 0;
};

class Metrics {
 public:
  explicit Metrics(const Bundle& b)
      : model_labels_("model=\"" + LabelValue(b.name) + "\",version=\"" + LabelValue(b.bundle_id) + "\""),
        inference_(LatencyBuckets()), request_(LatencyBuckets()) {}

  // endpoint: "infer", "metadata" or "ready" for a model's endpoints, else nullptr.
  void Answered(int status, const char* endpoint) {
    std::lock_guard<std::mutex> l(mu_);
    ++responses_[status];
    if (endpoint) ++model_requests_[{endpoint, status}];
  }
  void Inference(double seconds) {
    std::lock_guard<std::mutex> l(mu_);
    inference_.Observe(seconds);
  }
  void Request(double seconds) {
    std::lock_guard<std::mutex> l(mu_);
    request_.Observe(seconds);
  }
  void Dropped(const std::string& reason) {
    std::lock_guard<std::mutex> l(mu_);
    ++dropped_[reason];
  }

  std::string Render(const Gauges& g) const {
    std::lock_guard<std::mutex> l(mu_);
    std::string o;
    o.reserve(4096);
    auto head = [&](const char* name, const char* type, const char* help) {
      o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    };
    head("tvmbundle_requests_total", "counter",
         "Requests to the model's endpoints (infer, metadata, ready), by model, version, endpoint and HTTP status code.");
    for (const auto& kv : model_requests_) {
      o += "tvmbundle_requests_total{" + model_labels_ + ",endpoint=\"" + kv.first.first + "\",code=\"" +
           std::to_string(kv.first.second) + "\"} " + std::to_string(kv.second) + "\n";
    }
    head("tvmbundle_http_responses_total", "counter", "HTTP responses on every path, by status code.");
    for (const auto& kv : responses_) {
      o += "tvmbundle_http_responses_total{code=\"" + std::to_string(kv.first) + "\"} " + std::to_string(kv.second) +
           "\n";
    }
    head("tvmbundle_inference_duration_seconds", "histogram", "Time in the model for one inference.");
    inference_.Render(&o, "tvmbundle_inference_duration_seconds", model_labels_);
    head("tvmbundle_request_duration_seconds", "histogram",
         "Inference requests from the whole request received to the response ready (queue, decode, model, encode).");
    request_.Render(&o, "tvmbundle_request_duration_seconds", model_labels_);
    head("tvmbundle_requests_in_flight", "gauge", "Inference requests queued or running.");
    o += "tvmbundle_requests_in_flight{" + model_labels_ + "} " + std::to_string(g.in_flight) + "\n";
    head("tvmbundle_queue_length", "gauge", "Inference requests waiting for the model.");
    o += "tvmbundle_queue_length{" + model_labels_ + "} " + std::to_string(g.queue_length) + "\n";
    head("tvmbundle_queue_capacity", "gauge", "Inference requests that may wait before new ones get 503.");
    o += "tvmbundle_queue_capacity{" + model_labels_ + "} " + std::to_string(g.queue_capacity) + "\n";
    head("tvmbundle_model_load_seconds", "gauge", "Time to load the model (-1 while loading).");
    json::Writer ls;
    ls.Double(g.load_seconds);
    o += "tvmbundle_model_load_seconds{" + model_labels_ + "} " + ls.str() + "\n";
    head("tvmbundle_selftest_passed", "gauge", "1 when the bundle's selftest passed, 0 when it failed, -1 before it ran.");
    o += "tvmbundle_selftest_passed{" + model_labels_ + "} " + std::to_string(g.selftest) + "\n";
    head("tvmbundle_model_ready", "gauge", "1 when the model is ready for inference.");
    o += "tvmbundle_model_ready{" + model_labels_ + "} " + std::string(g.ready ? "1" : "0") + "\n";
    head("tvmbundle_connections_open", "gauge", "Client connections open.");
    o += "tvmbundle_connections_open " + std::to_string(g.connections) + "\n";
    head("tvmbundle_connections_dropped_total", "counter",
         "Connections the service ended early, by reason (idle_evicted, slow_evicted, rejected, timeout, ...).");
    for (const auto& kv : dropped_) {
      o += "tvmbundle_connections_dropped_total{reason=\"" + kv.first + "\"} " + std::to_string(kv.second) + "\n";
    }
    return o;
  }

 private:
  mutable std::mutex mu_;
  std::string model_labels_;
  std::map<int, uint64_t> responses_;
  std::map<std::pair<std::string, int>, uint64_t> model_requests_;
  std::map<std::string, uint64_t> dropped_;
  Histogram inference_, request_;
};

// ---- the service -----------------------------------------------------------------------------

struct Options {
  std::string listen;
  int max_connections = 256;
  int max_queue = 32;
  int idle_timeout = 5;      // seconds a keep-alive connection may sit between requests
  int request_timeout = 10;  // seconds for one whole request (head and body), and for writing its answer
};

constexpr int kMaxLinger = 256;                // connections closing (or refused) beyond max_connections
constexpr auto kLinger = std::chrono::seconds(2);
constexpr auto kSlowAfter = std::chrono::seconds(1);  // a request older than this may be evicted when full
constexpr uint64_t kListenTag = 1, kWakeTag = 2;

enum class State { kHead, kBody, kQueued, kWriting, kLinger };

struct Conn {
  int fd = -1;
  uint64_t id = 0;
  State state = State::kHead;
  std::string in;
  size_t scanned = 0;
  bool request_started = false;
  bool peer_eof = false;
  bool counted = true;  // counts against max_connections (not when closing or refused)
  http::RequestHead req;
  Clock::time_point request_start, idle_since, deadline;
  std::string out;
  size_t out_off = 0;
  bool keep_after_write = false;
  uint32_t events = 0;
  size_t drained = 0;
  bool served = false;  // has answered a request (so it is idle between requests, not new)
};

struct Job {
  uint64_t conn_id;
  bool v1;
  std::string body;
  size_t json_length;
  Clock::time_point received;
};

struct Done {
  uint64_t conn_id;
  Response resp;
};

class Service {
 public:
  Service(const Bundle& b, Options o) : b_(b), o_(std::move(o)), metrics_(b) {
    size_t elements = 0, bytes = 0;
    for (const auto& s : b.inputs) {
      bytes += s.Bytes();
      elements += s.Bytes() / std::max<size_t>(1, (s.dtype.bits + 7) / 8);
    }
    // Binary tensors plus their JSON header, or JSON data at up to 48 bytes an element.
    max_body_ = std::max(bytes + 64 * 1024, elements * 48 + 64 * 1024);
    std::string v = HarnessVersion();
    version_ = v.rfind("tvm-deploy ", 0) == 0 ? v.substr(11) : v;
  }

  int Run(int listen_fd);

 private:
  // loop
  void Accept();
  bool MakeRoom();
  void Refuse(int fd);
  Conn* Add(int fd, bool counted);
  void Close(Conn* c);
  void SetEvents(Conn* c, uint32_t events);
  bool Read(Conn* c);
  bool Process(Conn* c);
  bool Flush(Conn* c);
  bool BeginLinger(Conn* c);
  bool Drain(Conn* c);
  void StartWrite(Conn* c, Response r, const char* endpoint);
  void Dispatch(Conn* c, std::string body);
  void Route(Conn* c, std::string body, Response* r, const char** endpoint, bool* queued);
  void Timeouts(Clock::time_point now);
  int NextTimeoutMs(Clock::time_point now) const;
  void Completions();
  void Wake();
  Gauges CurrentGauges();

  // model thread
  void ModelThread();
  Response RunJob(Job& job);

  const Bundle& b_;
  Options o_;
  Metrics metrics_;
  size_t max_body_ = 0;
  std::string version_;

  int epfd_ = -1, wake_fd_ = -1, listen_fd_ = -1;
  bool listening_ = false;
  Clock::time_point accept_resume_{};
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns_;
  uint64_t next_id_ = 16;
  int active_ = 0, lingering_ = 0;

  std::atomic<bool> stopping_{false};
  std::atomic<bool> ready_{false};
  std::atomic<int> selftest_{-1};
  std::atomic<int> fail_code_{-1};
  std::atomic<double> load_seconds_{-1};

  std::unique_ptr<Model> model_;
  std::mutex mu_;  // guards queue_, running_, done_, stop_model_
  std::condition_variable cv_;
  std::deque<Job> queue_;
  bool running_ = false;
  bool stop_model_ = false;
  std::vector<Done> done_;
};

void Service::Wake() {
  uint64_t one = 1;
  ssize_t n = write(wake_fd_, &one, sizeof(one));
  (void)n;
}

Gauges Service::CurrentGauges() {
  Gauges g;
  g.ready = ready_;
  g.selftest = selftest_;
  g.load_seconds = load_seconds_;
  g.queue_capacity = size_t(o_.max_queue);
  g.connections = size_t(active_);
  std::lock_guard<std::mutex> l(mu_);
  g.queue_length = queue_.size();
  g.in_flight = queue_.size() + (running_ ? 1 : 0);
  return g;
}

Conn* Service::Add(int fd, bool counted) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  auto c = std::make_unique<Conn>();
  c->fd = fd;
  c->id = next_id_++;
  c->counted = counted;
  c->idle_since = Clock::now();
  c->deadline = c->idle_since + std::chrono::seconds(o_.idle_timeout);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = c->id;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
    close(fd);
    return nullptr;
  }
  c->events = EPOLLIN;
  if (counted) ++active_;
  Conn* raw = c.get();
  conns_.emplace(raw->id, std::move(c));
  return raw;
}

void Service::Close(Conn* c) {
  close(c->fd);  // also leaves the epoll set
  if (c->counted) --active_;
  if (c->state == State::kLinger) --lingering_;
  conns_.erase(c->id);
}

void Service::SetEvents(Conn* c, uint32_t events) {
  if (c->events == events) return;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = c->id;
  epoll_ctl(epfd_, EPOLL_CTL_MOD, c->fd, &ev);
  c->events = events;
}

// Frees a slot for a new client. In order: the longest-idle keep-alive connection (one that has
// answered a request, or sat silent for over a second); the oldest request still being received
// after more than a second (a slow or stalled client); a connection just opened that has sent
// nothing yet (most likely a client about to send, so last).
bool Service::MakeRoom() {
  Conn* idle = nullptr;
  Conn* fresh = nullptr;
  Conn* slow = nullptr;
  Clock::time_point now = Clock::now();
  for (auto& kv : conns_) {
    Conn* c = kv.second.get();
    if (!c->counted) continue;
    if (c->state == State::kHead && !c->request_started && c->in.empty()) {
      Conn*& pick = (c->served || now - c->idle_since > kSlowAfter) ? idle : fresh;
      if (!pick || c->idle_since < pick->idle_since) pick = c;
    } else if ((c->state == State::kHead || c->state == State::kBody) && c->request_started &&
               now - c->request_start > kSlowAfter) {
      if (!slow || c->request_start < slow->request_start) slow = c;
    }
  }
  Conn* victim = idle ? idle : slow ? slow : fresh;
  if (!victim) return false;
  metrics_.Dropped(victim == slow ? "slow_evicted" : "idle_evicted");
  Close(victim);
  return true;
}

void Service::Refuse(int fd) {
  if (lingering_ >= kMaxLinger) {
    metrics_.Dropped("refused");
    close(fd);
    return;
  }
  metrics_.Dropped("rejected");
  Conn* c = Add(fd, false);
  if (!c) return;
  Response r = Error(503, "too many connections; retry shortly");
  r.headers.emplace_back("Retry-After", "1");
  r.close = true;
  StartWrite(c, std::move(r), nullptr);
  Process(c);
}

void Service::Accept() {
  while (true) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors: stop accepting for a moment rather than spin on the listener.
        epoll_ctl(epfd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
        listening_ = false;
        accept_resume_ = Clock::now() + std::chrono::milliseconds(100);
      }
      return;
    }
    if (active_ >= o_.max_connections && !MakeRoom()) {
      Refuse(fd);
      continue;
    }
    Add(fd, true);
  }
}

bool Service::Read(Conn* c) {
  char buf[65536];
  while (true) {
    size_t limit;
    if (c->state == State::kHead) limit = http::kMaxHead + 8;
    else if (c->state == State::kBody) limit = c->req.content_length + http::kMaxHead;
    else break;  // not reading now
    if (c->in.size() >= limit) break;
    ssize_t n = recv(c->fd, buf, std::min(sizeof(buf), limit - c->in.size()), 0);
    if (n > 0) {
      c->in.append(buf, size_t(n));
      continue;
    }
    if (n == 0) {
      c->peer_eof = true;
      break;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    Close(c);
    return false;
  }
  return Process(c);
}

bool Service::BeginLinger(Conn* c) {
  // Half-close and read what the client still sends, so that closing with unread data does not
  // reset the connection before the client has read our answer.
  shutdown(c->fd, SHUT_WR);
  if (c->counted) {
    c->counted = false;
    --active_;
  }
  if (lingering_ >= kMaxLinger) {
    Close(c);
    return false;
  }
  ++lingering_;
  c->state = State::kLinger;
  std::string().swap(c->in);
  c->deadline = Clock::now() + kLinger;
  SetEvents(c, EPOLLIN);
  return true;
}

bool Service::Drain(Conn* c) {
  char buf[16384];
  while (true) {
    ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
    if (n > 0) {
      c->drained += size_t(n);
      if (c->drained > (4u << 20)) break;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    break;
  }
  Close(c);
  return false;
}

void Service::StartWrite(Conn* c, Response r, const char* endpoint) {
  bool keep = !r.close && c->req.keep_alive && !stopping_ && c->counted;
  metrics_.Answered(r.status, endpoint);
  c->out = http::FormatHead(r, keep);
  if (c->req.method != "HEAD") c->out += r.body;
  c->out_off = 0;
  c->keep_after_write = keep;
  c->state = State::kWriting;
  c->deadline = Clock::now() + std::chrono::seconds(o_.request_timeout);
}

// Sends what it can; false when the connection was closed.
bool Service::Flush(Conn* c) {
  while (c->out_off < c->out.size()) {
    ssize_t n = send(c->fd, c->out.data() + c->out_off, c->out.size() - c->out_off, MSG_NOSIGNAL);
    if (n > 0) {
      c->out_off += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      SetEvents(c, EPOLLOUT);
      return true;
    }
    Close(c);
    return false;
  }
  return true;
}

// Moves a connection along as far as the bytes at hand allow; false when it was closed.
bool Service::Process(Conn* c) {
  while (true) {
    switch (c->state) {
      case State::kLinger:
      case State::kQueued:
        return true;
      case State::kWriting: {
        if (!Flush(c)) return false;
        if (c->out_off < c->out.size()) return true;  // wait for EPOLLOUT
        std::string().swap(c->out);
        c->out_off = 0;
        if (!c->keep_after_write) return BeginLinger(c);
        c->state = State::kHead;
        c->served = true;
        c->request_started = false;
        c->scanned = 0;
        c->req = http::RequestHead();
        c->idle_since = Clock::now();
        c->deadline = c->idle_since + std::chrono::seconds(o_.idle_timeout);
        SetEvents(c, EPOLLIN);
        break;
      }
      case State::kHead: {
        if (!c->request_started) {
          // RFC 9112 2.2: ignore empty lines before a request line.
          size_t skip = c->in.find_first_not_of("\r\n");
          c->in.erase(0, skip == std::string::npos ? c->in.size() : skip);
          if (c->in.empty()) {
            if (c->peer_eof || stopping_) {
              Close(c);
              return false;
            }
            return true;
          }
          c->request_started = true;
          c->request_start = Clock::now();
          c->deadline = c->request_start + std::chrono::seconds(o_.request_timeout);
          c->scanned = 0;
        }
        size_t end = http::FindHeadEnd(c->in, &c->scanned);
        if (end == std::string::npos) {
          if (c->in.size() > http::kMaxHead) {
            Response r = Error(431, "request head larger than 16 KiB");
            r.close = true;
            StartWrite(c, std::move(r), nullptr);
            break;
          }
          if (c->peer_eof) {  // an incomplete request and nothing more to come
            Close(c);
            return false;
          }
          return true;
        }
        if (end > http::kMaxHead) {
          Response r = Error(431, "request head larger than 16 KiB");
          r.close = true;
          StartWrite(c, std::move(r), nullptr);
          break;
        }
        int status = 400;
        std::string problem;
        bool ok = http::ParseRequestHead(std::string_view(c->in).substr(0, end), &c->req, &status, &problem);
        c->in.erase(0, end);
        Response r;
        if (!ok) {
          r = Error(status, problem);
        } else if (c->req.chunked) {
          r = Error(501, "chunked request bodies are not supported; send Content-Length");
        } else if (c->req.method == "POST" && !c->req.has_length) {
          r = Error(411, "POST needs a Content-Length");
        } else if (c->req.content_length > max_body_) {
          r = Error(413, "body of " + std::to_string(c->req.content_length) + " bytes; at most " +
                             std::to_string(max_body_) + " are accepted");
        } else if (c->req.Header("content-encoding") && *c->req.Header("content-encoding") != "identity") {
          r = Error(415, "compressed request bodies (Content-Encoding: " + *c->req.Header("content-encoding") +
                             ") are not supported");
        }
        if (r.status != 200) {
          r.close = true;  // the rest of the stream cannot be trusted
          StartWrite(c, std::move(r), nullptr);
          break;
        }
        if (c->req.expect_continue && c->req.content_length > c->in.size()) {
          static const char kContinue[] = "HTTP/1.1 100 Continue\r\n\r\n";
          ssize_t n = send(c->fd, kContinue, sizeof(kContinue) - 1, MSG_NOSIGNAL);
          if (n != ssize_t(sizeof(kContinue) - 1)) {
            Close(c);
            return false;
          }
        }
        c->state = State::kBody;
        break;
      }
      case State::kBody: {
        if (c->in.size() < c->req.content_length) {
          if (c->peer_eof) {
            Close(c);
            return false;
          }
          return true;
        }
        std::string body = c->in.substr(0, c->req.content_length);
        c->in.erase(0, c->req.content_length);
        Dispatch(c, std::move(body));
        break;
      }
    }
  }
}

void Service::Dispatch(Conn* c, std::string body) {
  Response r;
  const char* endpoint = nullptr;
  bool queued = false;
  Route(c, std::move(body), &r, &endpoint, &queued);
  if (queued) {
    c->state = State::kQueued;
    c->deadline = Clock::time_point::max();
    SetEvents(c, 0);  // read nothing more until the answer is out (errors and hang-ups still arrive)
    return;
  }
  StartWrite(c, std::move(r), endpoint);
}

bool IsGet(const std::string& m) { return m == "GET" || m == "HEAD"; }

Response MethodNotAllowed(const char* allow) {
  Response r = Error(405, std::string("method not allowed; use ") + allow);
  r.headers.emplace_back("Allow", allow);
  return r;
}

void Service::Route(Conn* c, std::string body, Response* r, const char** endpoint, bool* queued) {
  const http::RequestHead& req = c->req;
  std::vector<std::string> seg;
  {
    size_t pos = 1;
    const std::string& p = req.path;
    while (pos <= p.size()) {
      size_t slash = p.find('/', pos);
      if (slash == std::string::npos) slash = p.size();
      std::string s;
      if (!http::DecodeSegment(std::string_view(p).substr(pos, slash - pos), &s)) {
        *r = Error(400, "malformed percent-encoding in the path");
        return;
      }
      seg.push_back(std::move(s));
      pos = slash + 1;
    }
    if (!seg.empty() && seg.back().empty() && seg.size() > 1) seg.pop_back();  // a trailing slash
  }
  auto enqueue = [&](bool v1, size_t json_length) {
    *endpoint = "infer";
    if (!ready_) {
      *r = Error(503, "starting: loading the model and running its selftest");
      r->headers.emplace_back("Retry-After", "1");
      return;
    }
    std::unique_lock<std::mutex> l(mu_);
    if (queue_.size() >= size_t(o_.max_queue)) {
      size_t n = queue_.size();
      l.unlock();
      *r = Error(503, "the inference queue is full (" + std::to_string(n) + " requests waiting); retry shortly");
      r->headers.emplace_back("Retry-After", "1");
      return;
    }
    queue_.push_back(Job{c->id, v1, std::move(body), json_length, Clock::now()});
    l.unlock();
    cv_.notify_one();
    *queued = true;
  };

  if (!seg.empty() && seg[0] == "v2") {
    if (seg.size() == 1) {
      *r = IsGet(req.method) ? Json(v2::ServerMetadata(version_)) : MethodNotAllowed("GET");
      return;
    }
    if (seg.size() == 3 && seg[1] == "health" && (seg[2] == "live" || seg[2] == "ready")) {
      if (!IsGet(req.method)) {
        *r = MethodNotAllowed("GET");
      } else if (seg[2] == "live") {
        *r = Json("{\"live\":true}");
      } else if (ready_) {
        *r = Json("{\"ready\":true}");
      } else {
        *r = Json("{\"ready\":false,\"error\":\"starting: loading the model and running its selftest\"}", 503);
      }
      return;
    }
    if (seg.size() == 3 && seg[1] == "repository" && seg[2] == "index") {
      // Triton's repository index, read-only: how a client finds the name of the one model here.
      if (req.method != "POST") {
        *r = MethodNotAllowed("POST");
        return;
      }
      json::Writer w(json::Writer::kCompact);
      w.BeginArray().BeginObject().Key("name").String(b_.name).Key("version").String(b_.bundle_id);
      w.Key("state").String(ready_ ? "READY" : "LOADING").EndObject().EndArray();
      *r = Json(w.Take());
      return;
    }
    if (seg.size() >= 3 && seg[1] == "models") {
      const std::string& name = seg[2];
      size_t k = seg.size() >= 5 && seg[3] == "versions" ? 5 : 3;
      std::string action = seg.size() == k ? "" : seg.size() == k + 1 ? seg[k] : "/";
      *endpoint = action == "infer" ? "infer" : action == "ready" ? "ready" : "metadata";
      if (name != b_.name) {
        *r = Error(404, "unknown model '" + name + "'; this service serves '" + b_.name + "'");
        return;
      }
      if (k == 5 && seg[4] != b_.bundle_id) {
        *r = Error(404, "unknown version '" + seg[4] + "' of model '" + b_.name + "'; it has version " +
                            b_.bundle_id);
        return;
      }
      if (action.empty()) {
        *r = IsGet(req.method) ? Json(v2::ModelMetadata(b_)) : MethodNotAllowed("GET");
      } else if (action == "ready") {
        if (!IsGet(req.method)) {
          *r = MethodNotAllowed("GET");
        } else {
          json::Writer w(json::Writer::kCompact);
          w.BeginObject().Key("name").String(b_.name).Key("ready").Bool(ready_).EndObject();
          *r = Json(w.Take(), ready_ ? 200 : 503);
        }
      } else if (action == "infer") {
        if (req.method != "POST") {
          *r = MethodNotAllowed("POST");
          return;
        }
        size_t json_length = v2::kNoBinary;
        if (const std::string* h = req.Header("inference-header-content-length")) {
          if (h->empty() || h->size() > 15 || h->find_first_not_of("0123456789") != std::string::npos) {
            *r = Error(400, "bad Inference-Header-Content-Length");
            return;
          }
          json_length = size_t(std::strtoull(h->c_str(), nullptr, 10));
        }
        enqueue(false, json_length);
      } else {
        *r = Error(404, "no such path under /v2/models/" + b_.name + "; try /ready or /infer");
      }
      return;
    }
    *r = Error(404, "no such path; this service speaks the Open Inference Protocol v2 (GET /v2, "
                    "/v2/health/ready, /v2/models/" + b_.name + ")");
    return;
  }
  if (req.path == "/metrics") {
    if (!IsGet(req.method)) {
      *r = MethodNotAllowed("GET");
      return;
    }
    r->content_type = "text/plain; version=0.0.4; charset=utf-8";
    r->body = metrics_.Render(CurrentGauges());
    return;
  }
  // Deprecated, kept for one transition: /healthz for monitors set up against older releases;
  // /v1/info and /v1/infer (.npy bodies) for scripts/bench-deploy and older clients.
  if (req.path == "/healthz") {
    if (!IsGet(req.method)) {
      *r = MethodNotAllowed("GET");
    } else if (!ready_) {
      *r = Error(503, "starting: loading the model and running its selftest");
    } else {
      r->content_type = "text/plain";
      r->body = "ok\n";
    }
    return;
  }
  if (req.path == "/v1/info") {
    *r = IsGet(req.method) ? Json(InfoJson(b_) + "\n") : MethodNotAllowed("GET");
    return;
  }
  if (req.path == "/v1/infer") {
    if (req.method != "POST") {
      *r = MethodNotAllowed("POST");
      return;
    }
    enqueue(true, v2::kNoBinary);
    return;
  }
  *r = Error(404, "no such path; this service speaks the Open Inference Protocol v2 (GET /v2, /v2/health/ready, "
                  "/v2/models/" + b_.name + "); metrics at /metrics");
}

void Service::Completions() {
  uint64_t n;
  while (read(wake_fd_, &n, sizeof(n)) > 0) {
  }
  std::vector<Done> done;
  {
    std::lock_guard<std::mutex> l(mu_);
    done.swap(done_);
  }
  for (Done& d : done) {
    auto it = conns_.find(d.conn_id);
    if (it == conns_.end()) continue;  // the client went away meanwhile
    Conn* c = it->second.get();
    StartWrite(c, std::move(d.resp), "infer");
    Process(c);
  }
}

void Service::Timeouts(Clock::time_point now) {
  std::vector<Conn*> due;
  for (auto& kv : conns_) {
    if (kv.second->deadline <= now) due.push_back(kv.second.get());
  }
  for (Conn* c : due) {
    switch (c->state) {
      case State::kHead:
        if (!c->request_started) {  // idle keep-alive connection
          Close(c);
          break;
        }
        [[fallthrough]];
      case State::kBody: {
        metrics_.Dropped("timeout");
        Response r = Error(408, "the request took longer than " + std::to_string(o_.request_timeout) + " s to arrive");
        r.close = true;
        StartWrite(c, std::move(r), nullptr);
        Process(c);
        break;
      }
      case State::kWriting:
        metrics_.Dropped("write_timeout");
        Close(c);
        break;
      case State::kLinger:
        Close(c);
        break;
      case State::kQueued:
        break;
    }
  }
}

int Service::NextTimeoutMs(Clock::time_point now) const {
  Clock::time_point next = now + std::chrono::seconds(1);
  for (const auto& kv : conns_) next = std::min(next, kv.second->deadline);
  if (!listening_ && !stopping_) next = std::min(next, accept_resume_);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(next - now).count() + 1;
  return int(std::max<int64_t>(0, ms));
}

Response Service::RunJob(Job& job) {
  Response r;
  try {
    if (job.v1) {
      std::vector<NpyArray> inputs;
      size_t off = 0;
      while (off < job.body.size()) {
        size_t used = 0;
        inputs.push_back(ParseNpy(reinterpret_cast<const uint8_t*>(job.body.data()) + off, job.body.size() - off,
                                  &used, "body array " + std::to_string(inputs.size())));
        off += used;
      }
      auto t0 = Clock::now();
      std::vector<NpyArray> outs = model_->Run(inputs);
      metrics_.Inference(Seconds(Clock::now() - t0));
      r.content_type = "application/x-npy";
      std::string names;
      for (size_t k = 0; k < outs.size(); ++k) {
        r.body += SerializeNpy(outs[k].dtype, outs[k].shape, outs[k].data.data(), outs[k].data.size());
        names += (k ? "," : "") + b_.outputs[k].name;
      }
      r.headers.emplace_back("X-Tvmbundle-Outputs", names);
    } else {
      v2::InferRequest req = v2::DecodeInferRequest(b_, job.body, job.json_length);
      std::string().swap(job.body);
      auto t0 = Clock::now();
      std::vector<NpyArray> outs = model_->Run(req.inputs);
      metrics_.Inference(Seconds(Clock::now() - t0));
      size_t json_length = v2::kNoBinary;
      r.body = v2::EncodeInferResponse(b_, req, outs, &json_length);
      if (json_length != v2::kNoBinary) {
        r.content_type = "application/octet-stream";
        r.headers.emplace_back("Inference-Header-Content-Length", std::to_string(json_length));
      }
    }
  } catch (const InputError& e) {
    r = Error(400, e.what());
  } catch (const std::bad_alloc&) {
    r = Error(500, "out of memory");
  } catch (const std::exception& e) {
    r = Error(500, e.what());
  }
  metrics_.Request(Seconds(Clock::now() - job.received));
  return r;
}

void Service::ModelThread() {
  auto t0 = Clock::now();
  try {
    model_ = std::make_unique<Model>(b_);
    load_seconds_ = Seconds(Clock::now() - t0);
    std::string why;
    if (!RunSelftestQuiet(b_, *model_, &why)) {
      selftest_ = 0;
      std::cerr << "tvm-deploy: serve: selftest failed, not serving: " << why << "\n";
      fail_code_ = 1;
      Wake();
      return;
    }
    selftest_ = 1;
    ready_ = true;
    std::cerr << "tvm-deploy: ready\n";
  } catch (const std::exception& e) {
    std::cerr << "tvm-deploy: serve: " << e.what() << "\n";
    fail_code_ = 3;
    Wake();
    return;
  }
  while (true) {
    Job job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_model_ || !queue_.empty(); });
      if (stop_model_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      running_ = true;
    }
    Response r = RunJob(job);
    {
      std::lock_guard<std::mutex> l(mu_);
      done_.push_back(Done{job.conn_id, std::move(r)});
      running_ = false;
    }
    Wake();
  }
}

int Service::Run(int listen_fd) {
  listen_fd_ = listen_fd;
  epfd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epfd_ < 0 || wake_fd_ < 0) {
    std::cerr << "tvm-deploy: serve: " << std::strerror(errno) << "\n";
    return 3;
  }
  fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kListenTag;
  epoll_ctl(epfd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  listening_ = true;
  ev.data.u64 = kWakeTag;
  epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_fd_, &ev);

  // Signals are taken by one thread with sigwait, so no handler runs inside TVM or a syscall.
  // Every thread started below inherits the blocked mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  std::thread stopper([this, sigs] {
    int sig = 0;
    sigwait(&sigs, &sig);
    stopping_ = true;
    Wake();
  });
  std::thread model([this] { ModelThread(); });

  int code = 0;
  Clock::time_point drain_deadline{};
  bool draining = false;
  std::vector<epoll_event> events(256);
  while (true) {
    Clock::time_point now = Clock::now();
    if (fail_code_ >= 0) {
      code = fail_code_;
      break;
    }
    if (stopping_ && !draining) {
      draining = true;
      drain_deadline = now + std::chrono::seconds(o_.idle_timeout);
      if (listening_) epoll_ctl(epfd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
      listening_ = false;
      close(listen_fd_);
      listen_fd_ = -1;
      std::vector<Conn*> idle;
      for (auto& kv : conns_) {
        Conn* c = kv.second.get();
        if (c->state == State::kHead && !c->request_started && c->in.empty()) idle.push_back(c);
      }
      for (Conn* c : idle) Close(c);
    }
    if (draining) {
      bool busy;
      {
        std::lock_guard<std::mutex> l(mu_);
        busy = running_ || !queue_.empty() || !done_.empty();
      }
      if ((conns_.empty() && !busy) || now >= drain_deadline) break;
    }
    if (!listening_ && !stopping_ && now >= accept_resume_) {
      ev.events = EPOLLIN;
      ev.data.u64 = kListenTag;
      epoll_ctl(epfd_, EPOLL_CTL_ADD, listen_fd_, &ev);
      listening_ = true;
    }
    int timeout = NextTimeoutMs(now);
    if (draining) {
      timeout = std::min<int64_t>(
          timeout, std::chrono::duration_cast<std::chrono::milliseconds>(drain_deadline - now).count() + 1);
    }
    int n = epoll_wait(epfd_, events.data(), int(events.size()), timeout);
    if (n < 0 && errno != EINTR) {
      std::cerr << "tvm-deploy: serve: epoll: " << std::strerror(errno) << "\n";
      code = 3;
      break;
    }
    for (int k = 0; k < n; ++k) {
      uint64_t tag = events[k].data.u64;
      uint32_t e = events[k].events;
      if (tag == kListenTag) {
        if (listening_) Accept();
        continue;
      }
      if (tag == kWakeTag) {
        Completions();
        continue;
      }
      auto it = conns_.find(tag);
      if (it == conns_.end()) continue;  // closed earlier in this round
      Conn* c = it->second.get();
      if (e & EPOLLERR) {
        Close(c);
        continue;
      }
      if (c->state == State::kLinger) {
        Drain(c);
        continue;
      }
      if (c->state == State::kWriting && (e & EPOLLOUT)) {
        if (!Process(c)) continue;
      }
      if ((e & EPOLLHUP) && c->state == State::kQueued) {
        Close(c);
        continue;
      }
      if (e & (EPOLLIN | EPOLLHUP)) Read(c);
    }
    Timeouts(Clock::now());
  }

  // Stop: close every connection, stop the model thread (after its current request), join all.
  std::vector<Conn*> all;
  for (auto& kv : conns_) all.push_back(kv.second.get());
  for (Conn* c : all) Close(c);
  if (listen_fd_ >= 0) close(listen_fd_);
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_model_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  model.join();
  if (!stopping_) pthread_kill(stopper.native_handle(), SIGTERM);  // wakes its sigwait
  stopper.join();
  close(wake_fd_);
  close(epfd_);
  return code;
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
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 512) == 0) break;
    *err = "--listen " + listen + ": " + std::strerror(errno);
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

// The address when none is given: TVM_DEPLOY_LISTEN, else the manifest's service.listen.
std::string DefaultListen(const Bundle& b) {
  const char* env = std::getenv("TVM_DEPLOY_LISTEN");
  if (env && *env) return env;
  return b.listen.empty() ? "127.0.0.1:8470" : b.listen;
}


// ---- probe -----------------------------------------------------------------------------------

class ProbeConn {
 public:
  ProbeConn(int fd, Clock::time_point deadline) : fd_(fd), deadline_(deadline) {}
  // One request and its whole answer; false with *why on a transport failure.
  bool Get(const std::string& path, const std::string& host, http::ResponseHead* head, std::string* body,
           std::string* why) {
    std::string req = "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nAccept: application/json\r\n\r\n";
    size_t off = 0;
    while (off < req.size()) {
      if (!Wait(POLLOUT, why)) return false;
      ssize_t n = send(fd_, req.data() + off, req.size() - off, MSG_NOSIGNAL);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) {
        *why = std::strerror(errno);
        return false;
      }
      off += size_t(n);
    }
    size_t end, scanned = 0;
    while ((end = http::FindHeadEnd(buf_, &scanned)) == std::string::npos) {
      if (buf_.size() > 65536) {
        *why = "answer head too large";
        return false;
      }
      if (!More(why)) return false;
    }
    *head = http::ResponseHead();
    if (!http::ParseResponseHead(std::string_view(buf_).substr(0, end), head) || !head->has_length ||
        head->content_length > (1u << 20)) {
      *why = "not an answer of tvm-deploy serve";
      return false;
    }
    buf_.erase(0, end);
    while (buf_.size() < head->content_length) {
      if (!More(why)) return false;
    }
    *body = buf_.substr(0, head->content_length);
    buf_.erase(0, head->content_length);
    return true;
  }

 private:
  bool Wait(short events, std::string* why) {
    while (true) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline_ - Clock::now()).count();
      if (left <= 0) {
        *why = "timed out";
        return false;
      }
      pollfd p{fd_, events, 0};
      int n = poll(&p, 1, int(left));
      if (n > 0) return true;
      if (n < 0 && errno != EINTR) {
        *why = std::strerror(errno);
        return false;
      }
    }
  }
  bool More(std::string* why) {
    char chunk[4096];
    while (true) {
      if (!Wait(POLLIN, why)) return false;
      ssize_t n = recv(fd_, chunk, sizeof(chunk), 0);
      if (n > 0) {
        buf_.append(chunk, size_t(n));
        return true;
      }
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      *why = n == 0 ? "connection closed before the answer was complete" : std::strerror(errno);
      return false;
    }
  }

  int fd_;
  Clock::time_point deadline_;
  std::string buf_;
};

std::string ErrorOf(const std::string& body) {
  json::Value v;
  std::string err;
  if (json::Parse(body, &v, &err) && v.IsObject()) {
    if (const json::Value* e = v.Find("error")) {
      if (e->IsString()) return e->str;
    }
  }
  return "";
}

}  // namespace

int Probe(const Bundle& b, const std::vector<std::string>& args) {
  std::string listen = DefaultListen(b), timeout_s = "5";
  std::vector<std::string> where;
  ArgParser("probe", args).Option("--timeout", &timeout_s).Positionals(&where).Parse();
  if (where.size() > 1) throw ArgError("probe: give one HOST:PORT at most");
  if (!where.empty()) listen = where[0];
  int timeout = ParseInt("--timeout", timeout_s, 1, 3600);
  auto deadline = Clock::now() + std::chrono::seconds(timeout);
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
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int rc = fd < 0 ? -1 : connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  std::string why;
  if (rc != 0 && errno == EINPROGRESS) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{fd, POLLOUT, 0};
    int err = 0;
    socklen_t len = sizeof(err);
    if (poll(&p, 1, int(std::max<int64_t>(1, left))) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0) {
      rc = err == 0 ? 0 : -1;
      errno = err ? err : ETIMEDOUT;
    } else {
      rc = -1;
      errno = ETIMEDOUT;
    }
  }
  if (rc != 0) {
    std::cerr << "tvm-deploy: probe: " << listen << ": " << std::strerror(errno) << "\n";
    if (fd >= 0) close(fd);
    return 1;
  }
  std::string host_header = host.find(':') != std::string::npos ? "[" + host + "]:" + port : host + ":" + port;
  ProbeConn pc(fd, deadline);
  http::ResponseHead head;
  std::string body;
  // Ready, and it is this bundle that answers: a deploy's health gate must not be satisfied by
  // an old process still holding the address.
  if (!pc.Get("/v2/health/ready", host_header, &head, &body, &why)) {
    std::cerr << "tvm-deploy: probe: " << listen << ": GET /v2/health/ready: " << why << "\n";
    close(fd);
    return 1;
  }
  if (head.status != 200) {
    std::string e = ErrorOf(body);
    std::cerr << "tvm-deploy: probe: " << listen << ": not ready (HTTP " << head.status
              << (e.empty() ? "" : ": " + e) << ")\n";
    close(fd);
    return 1;
  }
  std::string path = "/v2/models/" + http::EncodeSegment(b.name);
  if (head.close || !pc.Get(path, host_header, &head, &body, &why)) {
    std::cerr << "tvm-deploy: probe: " << listen << ": GET " << path << ": " << (why.empty() ? "connection closed" : why)
              << "\n";
    close(fd);
    return 1;
  }
  close(fd);
  if (head.status == 404) {
    std::cerr << "tvm-deploy: probe: " << listen << ": ready, but another bundle answers (no model '" << b.name
              << "' there: " << ErrorOf(body) << ")\n";
    return 1;
  }
  json::Value meta;
  std::string err;
  if (head.status != 200 || !json::Parse(body, &meta, &err) || !meta.IsObject()) {
    std::cerr << "tvm-deploy: probe: " << listen << ": GET " << path << ": HTTP " << head.status
              << (err.empty() ? "" : ", " + err) << "\n";
    return 1;
  }
  const json::Value* versions = meta.Find("versions");
  const json::Value* name = meta.Find("name");
  bool ours = name && name->IsString() && name->str == b.name && versions && versions->IsArray();
  std::string theirs;
  if (ours) {
    ours = false;
    for (const json::Value& v : versions->items) {
      if (!v.IsString()) continue;
      if (v.str == b.bundle_id) ours = true;
      theirs += (theirs.empty() ? "" : ", ") + v.str.substr(0, 12);
    }
  }
  if (!ours) {
    std::cerr << "tvm-deploy: probe: " << listen << ": ready, but another bundle answers (version "
              << (theirs.empty() ? "?" : theirs) << ", not " << b.bundle_id.substr(0, 12) << ")\n";
    return 1;
  }
  std::cout << "healthy\n";
  return 0;
}

int Serve(const Bundle& b, const std::vector<std::string>& args) {
  Options o;
  o.listen = DefaultListen(b);
  std::string err, connections, queue, idle, request;
  ArgParser("serve", args).Option("--listen", &o.listen).Option("--max-connections", &connections)
      .Option("--max-queue", &queue).Option("--idle-timeout", &idle).Option("--request-timeout", &request).Parse();
  if (!connections.empty()) o.max_connections = ParseInt("--max-connections", connections, 1, 65536);
  if (!queue.empty()) o.max_queue = ParseInt("--max-queue", queue, 1, 65536);
  if (!idle.empty()) o.idle_timeout = ParseInt("--idle-timeout", idle, 1, 3600);
  if (!request.empty()) o.request_timeout = ParseInt("--request-timeout", request, 1, 3600);
  signal(SIGPIPE, SIG_IGN);
  // Room for every connection and the ones closing: raise the soft descriptor limit if it is low.
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rlim_t(4096) && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, 4096);
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  int fd = Listen(o.listen, &err);
  if (fd < 0) {
    std::cerr << "tvm-deploy: serve: " << err << "\n";
    return 3;
  }
  std::cerr << "tvm-deploy: serving " << b.name << " (" << b.bundle_id.substr(0, 12) << ") on " << o.listen
            << " (Open Inference Protocol v2)\n";
  Service service(b, o);
  int code = service.Run(fd);
  if (code == 0) std::cerr << "tvm-deploy: stopped\n";
  return code;
}

}  // namespace tvmbundle
