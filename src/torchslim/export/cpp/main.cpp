// torchslim_runner: load a TorchScript file with libtorch and run it, with no Python involved.
//
//   torchslim_runner MODEL.pt INPUTS.bin OUTPUTS.bin [RUNS]
//
// INPUTS.bin / OUTPUTS.bin hold a list of tensors in a small raw format that
// torchslim.export._cpp reads and writes (little endian):
//   magic "TSLT", uint32 version = 1, uint32 count, then per tensor:
//   uint32 dtype (0 float32, 1 float64, 2 int64, 3 int32, 4 bool, 5 float16), uint32 ndim,
//   int64 dims[ndim], then the elements, contiguous, in row-major order.
// The model is called with the tensors as positional arguments; its result may be a tensor or a
// (nested) tuple/list of tensors, written flattened in order. With RUNS > 0 the forward is timed
// RUNS times after 3 warm-up runs and the median is printed in milliseconds.

#include <ATen/Parallel.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const char kMagic[4] = {'T', 'S', 'L', 'T'};

c10::ScalarType to_scalar_type(uint32_t code) {
  switch (code) {
    case 0: return torch::kFloat32;
    case 1: return torch::kFloat64;
    case 2: return torch::kInt64;
    case 3: return torch::kInt32;
    case 4: return torch::kBool;
    case 5: return torch::kFloat16;
    default: throw std::runtime_error("unknown dtype code " + std::to_string(code));
  }
}

uint32_t to_code(c10::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return 0;
    case torch::kFloat64: return 1;
    case torch::kInt64: return 2;
    case torch::kInt32: return 3;
    case torch::kBool: return 4;
    case torch::kFloat16: return 5;
    default: throw std::runtime_error(std::string("cannot write outputs of dtype ") + c10::toString(t));
  }
}

template <typename T>
T read_value(std::istream& in) {
  T value{};
  in.read(reinterpret_cast<char*>(&value), sizeof(T));
  if (!in) throw std::runtime_error("input file is truncated");
  return value;
}

template <typename T>
void write_value(std::ostream& out, T value) {
  out.write(reinterpret_cast<const char*>(&value), sizeof(T));
}

std::vector<torch::Tensor> read_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[4];
  in.read(magic, 4);
  if (!in || std::memcmp(magic, kMagic, 4) != 0) throw std::runtime_error(path + " is not a TSLT tensor file");
  if (read_value<uint32_t>(in) != 1) throw std::runtime_error(path + ": unsupported TSLT version");
  const uint32_t count = read_value<uint32_t>(in);
  std::vector<torch::Tensor> tensors;
  for (uint32_t i = 0; i < count; ++i) {
    const auto dtype = to_scalar_type(read_value<uint32_t>(in));
    const uint32_t ndim = read_value<uint32_t>(in);
    std::vector<int64_t> dims(ndim);
    for (auto& d : dims) d = read_value<int64_t>(in);
    torch::Tensor t = torch::empty(dims, torch::TensorOptions().dtype(dtype));
    in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
    if (!in) throw std::runtime_error(path + " is truncated");
    tensors.push_back(t);
  }
  return tensors;
}

void flatten(const c10::IValue& value, std::vector<torch::Tensor>& out) {
  if (value.isTensor()) {
    out.push_back(value.toTensor());
  } else if (value.isTuple()) {
    for (const auto& v : value.toTupleRef().elements()) flatten(v, out);
  } else if (value.isList()) {
    for (const auto& v : value.toListRef()) flatten(v, out);
  } else {
    throw std::runtime_error("the model returned a " + value.tagKind() + "; only tensors and tuples/lists of them are supported");
  }
}

void write_tensors(const std::string& path, const std::vector<torch::Tensor>& tensors) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  out.write(kMagic, 4);
  write_value<uint32_t>(out, 1);
  write_value<uint32_t>(out, static_cast<uint32_t>(tensors.size()));
  for (const auto& raw : tensors) {
    const torch::Tensor t = raw.detach().to(torch::kCPU).contiguous();
    write_value<uint32_t>(out, to_code(t.scalar_type()));
    write_value<uint32_t>(out, static_cast<uint32_t>(t.dim()));
    for (int64_t d : t.sizes()) write_value<int64_t>(out, d);
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
  if (!out) throw std::runtime_error("writing " + path + " failed");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: torchslim_runner MODEL.pt INPUTS.bin OUTPUTS.bin [RUNS]\n";
    return 2;
  }
  try {
    const int runs = argc == 5 ? std::stoi(argv[4]) : 0;
    torch::jit::script::Module module = torch::jit::load(argv[1], torch::kCPU);
    module.eval();
    std::vector<c10::IValue> inputs;
    for (auto& t : read_tensors(argv[2])) inputs.emplace_back(t);

    torch::NoGradGuard no_grad;
    c10::IValue result = module.forward(inputs);
    std::vector<torch::Tensor> outputs;
    flatten(result, outputs);
    write_tensors(argv[3], outputs);

    double median_ms = -1.0;
    if (runs > 0) {
      for (int i = 0; i < 3; ++i) module.forward(inputs);
      std::vector<double> times;
      for (int i = 0; i < runs; ++i) {
        const auto start = std::chrono::steady_clock::now();
        module.forward(inputs);
        const auto stop = std::chrono::steady_clock::now();
        times.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
      }
      std::sort(times.begin(), times.end());
      median_ms = times[times.size() / 2];
    }
    std::cout << "{\"outputs\": " << outputs.size() << ", \"threads\": " << at::get_num_threads()
              << ", \"median_ms\": " << median_ms << "}" << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "torchslim_runner: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
