// tvm-deploy: runs a bundled TVM model on the board.
//   info | run | bench | selftest | serve | probe | rpc     (tvm-deploy --help)
//   survey | prepare | install | activate | gc | status     the device side of a deploy (device.h)
// Exit codes: 0 ok, 1 selftest mismatch, 2 usage or bad input, 3 runtime/model failure.
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "device.h"
#include "json.h"
#include "model.h"
#include "npy.h"
#include "rpc.h"
#include "serve.h"

namespace tvmbundle {
namespace {

constexpr const char* kVersion = "tvm-deploy 1";
constexpr const char* kUsage =
    "usage: tvm-deploy [--bundle DIR] [--threads N] COMMAND [ARGS]\n"
    "\n"
    "commands:\n"
    "  info [--json]                         bundle id, board, model signature, versions\n"
    "  run [--output-dir DIR] IN.npy...      run once; inputs in order or as NAME=IN.npy;\n"
    "                                        writes DIR/<output name>.npy (default DIR: .)\n"
    "  bench [--warmup N] [--repeat N] [--json]   latency: mean/p50/p90/min/max in ms\n"
    "  selftest [--json]                     run the bundled inputs, compare with the bundled outputs\n"
    "  serve [--listen HOST:PORT] [--max-connections N] [--max-queue N] [--idle-timeout S]\n"
    "        [--request-timeout S]           inference service: Open Inference Protocol v2 over HTTP\n"
    "                                        (/v2/health/ready, /v2/models/NAME/infer, ...), /metrics\n"
    "  probe [HOST:PORT] [--timeout S]       exit 0 when the service there is ready and serves this bundle\n"
    "  rpc [--host H] [--port P] [--key K] [--tracker HOST:PORT] [--sessions N]\n"
    "                                        TVM RPC server for tuning on this board (needs no model;\n"
    "                                        default 127.0.0.1:9090, key tvmbundle)\n"
    "\n"
    "device commands (run by tvmbundle deploy/status/rollback over SSH; each prints one JSON document;\n"
    "--name N: bundle N's releases, current and unit tvmbundle@N.service under P/bundles/N; without it\n"
    "the single-service layout of tvmbundle 0.1, P/releases, P/current and tvmbundle.service):\n"
    "  survey --prefix P [--name N] [--unit-dir U] [--sudo] [--want SHA]...   what preflight needs to know\n"
    "  prepare --prefix P [--name N] [--sudo]   create the install layout (through sudo: then owned by the user)\n"
    "  install --prefix P [--name N] --manifest M|--release DIR [--unit FILE] [--from DIR] [--selftest]\n"
    "                                        check staged files, assemble the release from the store\n"
    "  activate --prefix P [--name N] --release ID|none [--unit-dir U] [--unit NAME] [--sudo]\n"
    "           [--health-timeout S] [--keep N] [--protect ID]... [--adopt ID]...\n"
    "                                        switch, restart, health gate (--adopt: take releases over\n"
    "                                        from the single-service layout)\n"
    "  gc --prefix P [--name N] --keep N [--protect ID]...   prune releases and unused store files\n"
    "  status --prefix P [--name N] [--unit NAME]   current and kept releases, service state, health\n"
    "                                        (without --name: of every bundle on the device)\n"
    "\n"
    "options:\n"
    "  --bundle DIR   the bundle folder (default: the folder above this program's bin/)\n"
    "  --threads N    TVM thread pool size (default: TVM's choice, or TVM_NUM_THREADS)\n"
    "\n"
    "environment: TVM_DEPLOY_LISTEN sets the address of serve and probe when none is given\n"
    "             (default: the manifest's service.listen)\n"
    "\n"
    "exit codes: 0 ok, 1 selftest mismatch, 2 usage or bad input, 3 model or runtime failure\n";

// Usage errors come from the one argument parser (device.h) or from a command's own checks.
using Usage = ArgError;

std::string DefaultBundleDir() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string exe(buf, size_t(n));
  // <bundle>/bin/tvm-deploy -> <bundle>
  for (int i = 0; i < 2; ++i) {
    size_t slash = exe.find_last_of('/');
    exe = slash == std::string::npos ? "." : (slash == 0 ? "/" : exe.substr(0, slash));
  }
  return exe;
}

void SpecsJson(json::Writer& w, const std::vector<TensorSpec>& specs) {
  w.BeginArray();
  for (const TensorSpec& s : specs) {
    w.BeginObject().Key("name").String(s.name).Key("dtype").String(s.dtype_name).Key("shape").BeginArray();
    for (int64_t d : s.shape) w.Int(d);
    w.EndArray().EndObject();
  }
  w.EndArray();
}

std::string SanitizeName(const std::string& name) {
  std::string out;
  for (char c : name) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-') ? c : '_';
  if (out.empty() || out == "." || out == "..") out = "output";
  return out;
}


// ---- commands -------------------------------------------------------------------------

int CmdInfo(const Bundle& b, const std::vector<std::string>& args) {
  bool as_json = false;
  ArgParser("info", args).Flag("--json", &as_json).Parse();
  if (as_json) {
    std::cout << InfoJson(b) << "\n";
    return 0;
  }
  std::cout << "bundle   " << b.bundle_id << "\nname     " << b.name << "\nboard    " << b.board
            << "\ncompiler apache-tvm " << b.compiler_tvm << ", apache-tvm-ffi " << b.compiler_ffi
            << "\nruntime  apache-tvm " << b.runtime_tvm << ", apache-tvm-ffi " << b.runtime_ffi << " ("
            << b.runtime_origin << (b.runtime_platform.empty() ? "" : ", " + b.runtime_platform) << ")\n";
  for (const auto& s : b.inputs) std::cout << "input    " << s.name << " " << s.dtype_name << ShapeString(s.shape) << "\n";
  for (const auto& s : b.outputs) std::cout << "output   " << s.name << " " << s.dtype_name << ShapeString(s.shape) << "\n";
  return 0;
}

int CmdRun(const Bundle& b, const std::vector<std::string>& args) {
  std::string out_dir = ".";
  std::vector<std::string> given, positional;
  std::map<std::string, std::string> named;
  ArgParser("run", args).Option("--output-dir", &out_dir).Positionals(&given).Parse();
  for (const std::string& a : given) {
    size_t eq = a.find('=');
    if (eq != std::string::npos && eq > 0) named[a.substr(0, eq)] = a.substr(eq + 1);
    else positional.push_back(a);
  }
  if (!named.empty() && !positional.empty()) throw Usage("run: give inputs either in order or all as NAME=FILE");
  std::vector<std::string> files;
  if (!named.empty()) {
    for (const auto& kv : named) {
      bool known = std::any_of(b.inputs.begin(), b.inputs.end(), [&](const TensorSpec& s) { return s.name == kv.first; });
      if (!known) {
        std::string names;
        for (const auto& s : b.inputs) names += (names.empty() ? "" : ", ") + s.name;
        throw InputError("unknown input '" + kv.first + "'; the model's inputs are: " + names);
      }
    }
    for (const auto& s : b.inputs) {
      auto it = named.find(s.name);
      if (it == named.end()) throw InputError("input '" + s.name + "' is missing");
      files.push_back(it->second);
    }
  } else {
    files = positional;
  }
  if (files.size() != b.inputs.size()) {
    throw InputError("the model takes " + std::to_string(b.inputs.size()) + " input(s), got " +
                     std::to_string(files.size()));
  }
  std::vector<NpyArray> arrays;
  for (size_t i = 0; i < files.size(); ++i) {
    try {
      arrays.push_back(LoadNpy(files[i]));
    } catch (const InputError& e) {
      throw InputError("input '" + b.inputs[i].name + "': " + e.what());
    }
  }
  Model model(b);
  std::vector<NpyArray> outs;
  try {
    outs = model.Run(arrays);
  } catch (const InputError& e) {
    // Name the file as well as the input, so the user knows which argument to fix.
    std::string msg = e.what();
    for (size_t i = 0; i < files.size(); ++i) {
      std::string tag = "input '" + b.inputs[i].name + "'";
      if (msg.rfind(tag, 0) == 0) msg = tag + " (" + files[i] + ")" + msg.substr(tag.size());
    }
    throw InputError(msg);
  }
  if (mkdir(out_dir.c_str(), 0755) != 0 && errno != EEXIST) {
    throw InputError("--output-dir " + out_dir + ": cannot create (" + std::strerror(errno) + ")");
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    std::string path = out_dir + "/" + SanitizeName(b.outputs[i].name) + ".npy";
    SaveNpy(path, outs[i].dtype, outs[i].shape, outs[i].data.data(), outs[i].data.size());
    std::cout << path << "\n";
  }
  return 0;
}

std::vector<NpyArray> SelftestInputs(const Bundle& b) {
  std::vector<NpyArray> arrays;
  for (const auto& rel : b.selftest_inputs) arrays.push_back(LoadNpy(b.Path(rel)));
  return arrays;
}

int CmdBench(const Bundle& b, const std::vector<std::string>& args) {
  std::string warmup_s = "3", repeat_s = "20";
  bool as_json = false;
  ArgParser("bench", args).Option("--warmup", &warmup_s).Option("--repeat", &repeat_s).Flag("--json", &as_json).Parse();
  int warmup = ParseInt("--warmup", warmup_s, 0), repeat = ParseInt("--repeat", repeat_s, 1);
  Model model(b);
  std::vector<tvm::ffi::Tensor> inputs = model.MakeInputs(SelftestInputs(b));
  for (int i = 0; i < warmup; ++i) model.Invoke(inputs);
  std::vector<double> ms;
  for (int i = 0; i < repeat; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    model.Invoke(inputs);
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::vector<double> sorted = ms;
  std::sort(sorted.begin(), sorted.end());
  auto pct = [&](double p) { return sorted[std::min(sorted.size() - 1, size_t(std::ceil(p * sorted.size())) - (p > 0 ? 1 : 0))]; };
  double mean = 0;
  for (double v : ms) mean += v / ms.size();
  int threads = RuntimeThreads();
  if (as_json) {
    json::Writer w;
    w.BeginObject().Key("mean_ms").Fixed(mean, 4).Key("p50_ms").Fixed(pct(0.5), 4).Key("p90_ms").Fixed(pct(0.9), 4)
        .Key("min_ms").Fixed(sorted.front(), 4).Key("max_ms").Fixed(sorted.back(), 4).Key("repeat").Int(repeat)
        .Key("warmup").Int(warmup).Key("threads").Int(threads).EndObject();
    std::cout << w.str() << "\n";
    return 0;
  }
  char line[512];
  std::snprintf(line, sizeof(line),
                "mean %.3f ms  p50 %.3f ms  p90 %.3f ms  min %.3f ms  max %.3f ms  (%d runs after %d warm-up, "
                "%d threads)",
                mean, pct(0.5), pct(0.9), sorted.front(), sorted.back(), repeat, warmup, threads);
  std::cout << line << "\n";
  return 0;
}

double AsDouble(const NpyArray& a, int64_t i) {
  const uint8_t* p = a.data.data();
  switch (a.dtype.code) {
    case kDLFloat:
      if (a.dtype.bits == 32) { float v; std::memcpy(&v, p + 4 * i, 4); return v; }
      if (a.dtype.bits == 64) { double v; std::memcpy(&v, p + 8 * i, 8); return v; }
      if (a.dtype.bits == 16) {
        uint16_t h; std::memcpy(&h, p + 2 * i, 2);
        int e = (h >> 10) & 0x1f, m = h & 0x3ff; double s = (h & 0x8000) ? -1 : 1;
        if (e == 0) return s * std::ldexp(m, -24);
        if (e == 31) return m ? NAN : s * INFINITY;
        return s * std::ldexp(m + 1024, e - 25);
      }
      break;
    case kDLInt:
      if (a.dtype.bits == 8) return int8_t(p[i]);
      if (a.dtype.bits == 16) { int16_t v; std::memcpy(&v, p + 2 * i, 2); return v; }
      if (a.dtype.bits == 32) { int32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
      if (a.dtype.bits == 64) { int64_t v; std::memcpy(&v, p + 8 * i, 8); return double(v); }
      break;
    case kDLUInt:
    case kDLBool:
      if (a.dtype.bits == 8) return p[i];
      if (a.dtype.bits == 16) { uint16_t v; std::memcpy(&v, p + 2 * i, 2); return v; }
      if (a.dtype.bits == 32) { uint32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
      if (a.dtype.bits == 64) { uint64_t v; std::memcpy(&v, p + 8 * i, 8); return double(v); }
      break;
  }
  return NAN;
}

struct OutputCheck {
  std::string name;
  bool ok = true;
  double worst = 0;
  int64_t worst_at = -1;
  std::string why;
};

std::vector<OutputCheck> CompareOutputs(const Bundle& b, const std::vector<NpyArray>& outs) {
  std::vector<OutputCheck> checks;
  for (size_t k = 0; k < outs.size(); ++k) {
    NpyArray want = LoadNpy(b.Path(b.selftest_expected[k]));
    const NpyArray& got = outs[k];
    OutputCheck c;
    c.name = b.outputs[k].name;
    if (got.shape != want.shape || DTypeName(got.dtype) != DTypeName(want.dtype)) {
      c.ok = false;
      c.why = "got " + DTypeName(got.dtype) + ShapeString(got.shape) + ", expected " + DTypeName(want.dtype) +
              ShapeString(want.shape);
    } else {
      bool exact = got.dtype.code != kDLFloat;
      for (int64_t i = 0; i < got.NumElements(); ++i) {
        double g = AsDouble(got, i), w = AsDouble(want, i);
        bool both_nan = std::isnan(g) && std::isnan(w);
        double diff = both_nan ? 0.0 : std::fabs(g - w);
        if (std::isnan(diff)) diff = INFINITY;
        bool bad = exact ? (g != w && !both_nan) : !(diff <= b.atol + b.rtol * std::fabs(w));
        if (c.worst_at < 0 || diff > c.worst) {
          c.worst = diff;
          c.worst_at = i;
        }
        if (bad && c.ok) {
          c.ok = false;
          c.why = "element " + std::to_string(i) + ": got " + std::to_string(g) + ", expected " + std::to_string(w);
        }
      }
    }
    checks.push_back(std::move(c));
  }
  return checks;
}

void CheckSelftestFiles(const Bundle& b) {
  if (b.selftest_expected.size() != b.outputs.size()) {
    throw RuntimeFailure("manifest.json: selftest.expected lists " + std::to_string(b.selftest_expected.size()) +
                         " file(s) for " + std::to_string(b.outputs.size()) + " output(s)");
  }
}

int CmdSelftest(const Bundle& b, const std::vector<std::string>& args) {
  bool as_json = false;
  ArgParser("selftest", args).Flag("--json", &as_json).Parse();
  CheckSelftestFiles(b);
  Model model(b);
  std::vector<OutputCheck> checks = CompareOutputs(b, model.Run(SelftestInputs(b)));
  bool all_ok = std::all_of(checks.begin(), checks.end(), [](const OutputCheck& c) { return c.ok; });
  std::ostringstream text;
  json::Writer js;
  js.BeginObject().Key("passed").Bool(all_ok).Key("rtol").Double(b.rtol).Key("atol").Double(b.atol).Key("outputs").BeginArray();
  for (const OutputCheck& c : checks) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.6g", c.worst);
    js.BeginObject().Key("name").String(c.name).Key("passed").Bool(c.ok)
        .Key("max_abs_diff").Raw(std::isfinite(c.worst) ? buf : "1e308").Key("worst_index").Int(c.worst_at);
    if (!c.ok) js.Key("problem").String(c.why);
    js.EndObject();
    text << (c.ok ? "PASS " : "FAIL ") << c.name << ": max abs diff " << buf;
    if (!c.ok) text << " (" << c.why << ")";
    text << "\n";
  }
  js.EndArray().EndObject();
  if (as_json) {
    std::cout << js.str() << "\n";
  } else {
    std::cout << text.str() << (all_ok ? "selftest passed" : "selftest FAILED") << " (rtol " << b.rtol << ", atol "
              << b.atol << ")\n";
  }
  if (!all_ok) std::cerr << "tvm-deploy: selftest failed\n" << text.str();
  return all_ok ? 0 : 1;
}

}  // namespace

bool RunSelftestQuiet(const Bundle& b, Model& model, std::string* why) {
  CheckSelftestFiles(b);
  for (const OutputCheck& c : CompareOutputs(b, model.Run(SelftestInputs(b)))) {
    if (!c.ok) {
      *why = "output '" + c.name + "': " + c.why;
      return false;
    }
  }
  return true;
}

std::string InfoJson(const Bundle& b) {
  json::Writer w;
  w.BeginObject().Key("bundle_id").String(b.bundle_id).Key("name").String(b.name).Key("board").String(b.board);
  w.Key("inputs");
  SpecsJson(w, b.inputs);
  w.Key("outputs");
  SpecsJson(w, b.outputs);
  w.Key("compiler").BeginObject().Key("apache-tvm").String(b.compiler_tvm).Key("apache-tvm-ffi").String(b.compiler_ffi)
      .EndObject();
  w.Key("runtime").BeginObject().Key("origin").String(b.runtime_origin).Key("apache-tvm").String(b.runtime_tvm)
      .Key("apache-tvm-ffi").String(b.runtime_ffi).Key("platform").String(b.runtime_platform).EndObject();
  w.Key("harness").String(kVersion).EndObject();
  return w.Take();
}

const char* HarnessVersion() { return kVersion; }

int Main(int argc, char** argv) {
  std::string bundle_dir, threads, cmd;
  std::vector<std::string> args(argv + 1, argv + argc), rest;
  // The global options go before or after the command (the systemd unit writes them after it);
  // everything else after the command is the command's own, parsed by its ArgParser.
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--bundle" || a == "--threads") {
      if (i + 1 >= args.size()) throw Usage(a + " needs a value");
      (a == "--bundle" ? bundle_dir : threads) = args[++i];
    } else if (a.rfind("--bundle=", 0) == 0 || a.rfind("--threads=", 0) == 0) {
      (a[2] == 'b' ? bundle_dir : threads) = a.substr(a.find('=') + 1);
    } else if (a == "--help" || (cmd.empty() && a == "-h")) {
      std::cout << kUsage;
      return 0;
    } else if (cmd.empty() && a == "--version") {
      std::cout << kVersion << "\n";
      return 0;
    } else if (cmd.empty()) {
      if (a.rfind("-", 0) == 0) throw Usage("unknown option '" + a + "'");
      cmd = a;
    } else {
      rest.push_back(a);
    }
  }
  if (cmd.empty()) throw Usage("no command given");
  if (!threads.empty()) threads = std::to_string(ParseInt("--threads", threads, 1));
  // The device side of a deploy needs no bundle loaded (it runs from the agent folder too).
  if (IsDeviceCommand(cmd)) return DeviceCommand(cmd, rest);
  // TVM sizes its thread pool from TVM_NUM_THREADS when the pool first starts.
  if (!threads.empty()) setenv("TVM_NUM_THREADS", threads.c_str(), 1);
  if (cmd == "rpc") {
    try {
      return RpcServe(rest);
    } catch (const std::invalid_argument& e) {
      throw Usage(e.what());
    }
  }
  if (cmd != "info" && cmd != "run" && cmd != "bench" && cmd != "selftest" && cmd != "serve" &&
      cmd != "probe") {
    throw Usage("unknown command '" + cmd + "'");
  }
  Bundle b = Bundle::Load(bundle_dir.empty() ? DefaultBundleDir() : bundle_dir);
  if (cmd == "info") return CmdInfo(b, rest);
  if (cmd == "run") return CmdRun(b, rest);
  if (cmd == "bench") return CmdBench(b, rest);
  if (cmd == "selftest") return CmdSelftest(b, rest);
  if (cmd == "probe") return Probe(b, rest);
  return Serve(b, rest);
}

}  // namespace tvmbundle

int main(int argc, char** argv) {
  using namespace tvmbundle;
  try {
    return Main(argc, argv);
  } catch (const Usage& e) {
    std::cerr << "tvm-deploy: " << e.what() << "\n(tvm-deploy --help lists the commands)\n";
    return 2;
  } catch (const InputError& e) {
    std::cerr << "tvm-deploy: error: " << e.what() << "\n";
    return 2;
  } catch (const RuntimeFailure& e) {
    std::cerr << "tvm-deploy: error: " << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "tvm-deploy: error: " << e.what() << "\n";
    return 3;
  }
}
