#include "common/hdf5_io.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>

namespace moba::h5 {
namespace {

// Turns HDF5's automatic error printing off once (every call is checked here instead) and its exit-time clean-up
// off: a file whose close failed (full disk) stays in HDF5's table, and HDF5 1.10's clean-up of it at exit
// crashes (segfault in H5F__close_cb) after the error was reported. Every file this layer opens is closed by
// its Handle before exit, so the clean-up has nothing else to do.
struct SilenceHdf5 {
  SilenceHdf5() {
    H5dont_atexit();  // must come before any other HDF5 call
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
};
const SilenceHdf5 silence;

// The innermost message of HDF5's error stack after a failed call ("" when empty), and whether the failure was
// a checksum mismatch (of a data chunk: Fletcher32; of metadata: the 1.10 format's checksums). HDF5 1.10 has no
// error code for it, so the messages are searched ("data error detected by Fletcher32 checksum", "incorrect
// metadata checksum ...").
struct Hdf5Failure {
  std::string detail;
  bool checksum = false;
};

herr_t collect_failure(unsigned, const H5E_error2_t* e, void* data) {
  auto* f = static_cast<Hdf5Failure*>(data);
  std::string desc = e->desc ? e->desc : "";
  std::string lower = desc;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower.find("checksum") != std::string::npos) f->checksum = true;
  // A failed write reads "file write failed: time = ..., errno = 28, error message = 'No space left on
  // device', ..."; keep what failed and the system's reason.
  if (size_t reason = desc.find("error message = '"); reason != std::string::npos) {
    size_t start = reason + 17, end = desc.find('\'', start);
    desc = cat(desc.substr(0, desc.find(':')), ": ", desc.substr(start, end - start));
  }
  if (!desc.empty()) f->detail = desc;  // walking downward, the last one is the innermost
  return 0;
}

Hdf5Failure last_failure() {
  Hdf5Failure f;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_failure, &f);  // does not clear the stack
  return f;
}

constexpr const char* kReadHint =
    "the file is truncated or damaged; recreate it (datasets: moba prep; checkpoints: resume from an older one)";
constexpr const char* kWriteHint = "free some disk space (or raise the quota) and check that the directory is writable";
constexpr const char* kCorruptHint =
    "the file was damaged after it was written (disk, copy or transfer); recreate it (datasets: moba prep; "
    "checkpoints: resume from an older one)";

// Throws the moba::Error for a failed HDF5 call; `what` names the file and the object. A checksum mismatch is
// named as corruption, anything else as an incomplete or damaged file, with HDF5's own reason appended.
[[noreturn]] void throw_hdf5_failure(const std::string& what, const std::string& hint) {
  Hdf5Failure f = last_failure();
  std::string detail = f.detail.empty() ? "" : cat(" (HDF5: ", f.detail, ")");
  if (f.checksum) throw Error(cat(what, ": the file is corrupt, a checksum does not match", detail), kCorruptHint);
  throw Error(cat(what, detail), hint);
}

// MOBA_H5_CHECK(status, what, hint): an HDF5 call's negative status becomes a moba::Error (see above).
#define MOBA_H5_CHECK(expr, what, hint)                                                                    \
  do {                                                                                                     \
    if ((expr) < 0) throw_hdf5_failure(::moba::cat("HDF5: ", what), hint);                                 \
  } while (0)

// Chunk shape for a fixed-size dataset: whole rows of the leading dimension, about kChunkElements each.
constexpr int64_t kChunkElements = 1 << 20;  // 4 MiB of f32: one Fletcher32 checksum per chunk

std::vector<hsize_t> chunk_shape(const std::vector<hsize_t>& dims) {
  std::vector<hsize_t> chunk = dims;
  hsize_t row = 1;
  for (size_t i = 1; i < dims.size(); ++i) row *= dims[i];
  chunk[0] = std::clamp<hsize_t>(static_cast<hsize_t>(kChunkElements) / std::max<hsize_t>(row, 1), 1, dims[0]);
  return chunk;
}

// Dataset-creation properties every writer uses: chunked, with a Fletcher32 checksum per chunk.
Handle checksummed_chunks(const std::vector<hsize_t>& chunk) {
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), Handle::Kind::plist);
  MOBA_H5_CHECK(H5Pset_chunk(dcpl.id(), static_cast<int>(chunk.size()), chunk.data()), "chunked layout", kWriteHint);
  MOBA_H5_CHECK(H5Pset_fletcher32(dcpl.id()), "Fletcher32 filter", kWriteHint);
  return dcpl;
}

// The filters of a dataset's pipeline (Fletcher32, deflate, ...), in order.
std::vector<H5Z_filter_t> filters_of(hid_t dcpl) {
  std::vector<H5Z_filter_t> filters;
  for (int i = 0, n = H5Pget_nfilters(dcpl); i < n; ++i) {
    unsigned flags = 0;
    size_t n_values = 0;
    filters.push_back(H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &n_values, nullptr, 0, nullptr, nullptr));
  }
  return filters;
}

std::string norm(const std::string& name) { return name.empty() || name[0] != '/' ? "/" + name : name; }

}  // namespace

const char* stored_type_name(StoredType t) {
  switch (t) {
    case StoredType::u8: return "uint8";
    case StoredType::u16: return "uint16";
    case StoredType::u32: return "uint32";
    case StoredType::u64: return "uint64";
    case StoredType::i8: return "int8";
    case StoredType::i16: return "int16";
    case StoredType::i32: return "int32";
    case StoredType::i64: return "int64";
    case StoredType::f32: return "float32";
    case StoredType::f64: return "float64";
    default: return "other";
  }
}

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    close();
    id_ = o.id_;
    kind_ = o.kind_;
    o.id_ = -1;
  }
  return *this;
}

void Handle::close() {
  if (id_ < 0) return;
  switch (kind_) {
    case Kind::file: H5Fclose(id_); break;
    case Kind::dataset: H5Dclose(id_); break;
    case Kind::dataspace: H5Sclose(id_); break;
    case Kind::group: H5Gclose(id_); break;
    case Kind::attribute: H5Aclose(id_); break;
    case Kind::datatype: H5Tclose(id_); break;
    case Kind::plist: H5Pclose(id_); break;
  }
  id_ = -1;
}

File File::open_read(const std::string& path) {
  MOBA_CHECK(std::filesystem::exists(path), cat("file not found: ", path),
             "check the path (relative paths are taken from the current directory)");
  MOBA_CHECK(H5Fis_hdf5(path.c_str()) > 0, cat(path, " is not a valid HDF5 file (truncated or corrupt?)"),
             "recreate it (for datasets: moba prep; for checkpoints: delete it and resume from an older one)");
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0)
    throw_hdf5_failure(cat("cannot open HDF5 file ", path, " (truncated or corrupt?)"),
                       "recreate the file; a truncated file cannot be read");
  return File(Handle(id, Handle::Kind::file), path);
}

File File::open_write(const std::string& path) {
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  if (id < 0)
    throw_hdf5_failure(cat("cannot open HDF5 file ", path, " for writing"), "check that it exists and is writable");
  return File(Handle(id, Handle::Kind::file), path);
}

File File::create(const std::string& path) {
  // The 1.10 format (readable by h5py and HDF5 >= 1.10) checksums all metadata, chunk indexes included.
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), Handle::Kind::plist);
  MOBA_H5_CHECK(H5Pset_libver_bounds(fapl.id(), H5F_LIBVER_V110, H5F_LIBVER_V110), "file format 1.10", kWriteHint);
  hid_t id = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id());
  if (id < 0) throw_hdf5_failure(cat("cannot create HDF5 file ", path), kWriteHint);
  return File(Handle(id, Handle::Kind::file), path);
}

bool File::exists(const std::string& name) const {
  // Walk the path so that a missing intermediate group is "false", not an error.
  std::string p = norm(name);
  size_t pos = 1;
  while (true) {
    size_t next = p.find('/', pos);
    std::string prefix = p.substr(0, next);
    htri_t found = H5Lexists(id(), prefix.c_str(), H5P_DEFAULT);
    MOBA_H5_CHECK(found, cat("cannot look up ", prefix, " in ", path_), kReadHint);
    if (found == 0) return false;
    if (next == std::string::npos) return true;
    pos = next + 1;
  }
}

void File::create_group(const std::string& name) {
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), Handle::Kind::plist);
  H5Pset_create_intermediate_group(lcpl.id(), 1);
  Handle g(H5Gcreate2(id(), norm(name).c_str(), lcpl.id(), H5P_DEFAULT, H5P_DEFAULT), Handle::Kind::group);
  MOBA_H5_CHECK(g.id(), cat("cannot create group ", name, " in ", path_), kWriteHint);
}

std::vector<std::string> File::list(const std::string& group) const {
  Handle g(H5Gopen2(id(), norm(group).c_str(), H5P_DEFAULT), Handle::Kind::group);
  MOBA_H5_CHECK(g.id(), cat("no group ", group, " in ", path_), kReadHint);
  H5G_info_t info;
  MOBA_H5_CHECK(H5Gget_info(g.id(), &info), cat("cannot list ", group, " in ", path_), kReadHint);
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    ssize_t len = H5Lget_name_by_idx(g.id(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    MOBA_H5_CHECK(len, cat("cannot list ", group, " in ", path_), kReadHint);
    std::string s(static_cast<size_t>(len), '\0');
    H5Lget_name_by_idx(g.id(), ".", H5_INDEX_NAME, H5_ITER_INC, i, s.data(), s.size() + 1, H5P_DEFAULT);
    names.push_back(s);
  }
  std::sort(names.begin(), names.end());
  return names;
}

Handle File::open_dataset(const std::string& dataset) const {
  MOBA_CHECK(exists(dataset), cat(path_, " has no dataset '", dataset, "'"),
             "the file was not written by this version of moba, or is incomplete; recreate it");
  Handle d(H5Dopen2(id(), norm(dataset).c_str(), H5P_DEFAULT), Handle::Kind::dataset);
  MOBA_H5_CHECK(d.id(), cat("cannot open dataset ", dataset, " in ", path_), kReadHint);
  return d;
}

Handle File::open_object(const std::string& object) const {
  MOBA_CHECK(object == "/" || exists(object), cat(path_, " has no object '", object, "'"),
             "the file is incomplete or from another tool; recreate it");
  hid_t oid = H5Oopen(id(), norm(object).c_str(), H5P_DEFAULT);
  MOBA_H5_CHECK(oid, cat("cannot open ", object, " in ", path_), kReadHint);
  // H5Oopen returns a dataset or group id; both close with H5Oclose, which H5Gclose/H5Dclose wrap.
  H5I_type_t t = H5Iget_type(oid);
  return Handle(oid, t == H5I_DATASET ? Handle::Kind::dataset : Handle::Kind::group);
}

bool File::is_group(const std::string& name) const {
  Handle o = open_object(name);
  return H5Iget_type(o.id()) == H5I_GROUP;
}

std::vector<int64_t> File::shape(const std::string& dataset) const {
  Handle d = open_dataset(dataset);
  Handle space(H5Dget_space(d.id()), Handle::Kind::dataspace);
  int rank = H5Sget_simple_extent_ndims(space.id());
  MOBA_H5_CHECK(rank, cat("cannot read the shape of ", dataset, " in ", path_), kReadHint);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5Sget_simple_extent_dims(space.id(), dims.data(), nullptr);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

bool File::has_checksum(const std::string& dataset) const {
  Handle d = open_dataset(dataset);
  Handle dcpl(H5Dget_create_plist(d.id()), Handle::Kind::plist);
  MOBA_H5_CHECK(dcpl.id(), cat("cannot read the layout of ", dataset, " in ", path_), kReadHint);
  const std::vector<H5Z_filter_t> filters = filters_of(dcpl.id());
  return std::find(filters.begin(), filters.end(), H5Z_FILTER_FLETCHER32) != filters.end();
}

int64_t File::numel(const std::string& dataset) const {
  // A damaged header can claim any shape: before anyone allocates, the element count must fit what the file can
  // store, and the storage must hold them all: a contiguous or compact block exactly (libhdf5 1.10 copies the whole
  // extent out of a shorter block: a crash, found by fuzz/fuzz_dataset), uncompressed chunks at least (a chunk
  // missing from a damaged index would read as zeros). Compressed data (test vectors written by h5py; moba itself
  // never compresses) is bounded by deflate's largest ratio instead.
  Handle d = open_dataset(dataset);
  Handle type(H5Dget_type(d.id()), Handle::Kind::datatype);
  Handle dcpl(H5Dget_create_plist(d.id()), Handle::Kind::plist);
  bool compressed = false;
  for (H5Z_filter_t filter : filters_of(dcpl.id())) compressed |= filter != H5Z_FILTER_FLETCHER32;
  hsize_t file_bytes = 0;
  MOBA_H5_CHECK(H5Fget_filesize(id(), &file_bytes), cat("cannot get the size of ", path_), kReadHint);
  const hsize_t capacity = compressed ? file_bytes * 1032 : file_bytes;
  int64_t n = 1, bytes = static_cast<int64_t>(std::max<size_t>(H5Tget_size(type.id()), 1));
  for (int64_t extent : shape(dataset)) {
    MOBA_CHECK(!__builtin_mul_overflow(n, extent, &n) && !__builtin_mul_overflow(bytes, extent, &bytes) &&
                   static_cast<hsize_t>(bytes) <= capacity,
               cat(path_, ": dataset '", dataset, "' claims more elements than the file's ", file_bytes,
                   " bytes can hold: the file is corrupt"),
               kCorruptHint);
  }
  const H5D_layout_t layout = H5Pget_layout(dcpl.id());
  const hsize_t stored = H5Dget_storage_size(d.id());
  MOBA_CHECK(n == 0 || (layout == H5D_CHUNKED ? compressed || stored >= static_cast<hsize_t>(bytes)
                                               : stored == static_cast<hsize_t>(bytes)),
             cat(path_, ": dataset '", dataset, "' stores ", stored, " bytes for ", n, " elements (", bytes,
                 " bytes): the file is corrupt"),
             kCorruptHint);
  return n;
}

StoredType File::stored_type(const std::string& dataset) const {
  Handle d = open_dataset(dataset);
  Handle t(H5Dget_type(d.id()), Handle::Kind::datatype);
  H5T_class_t cls = H5Tget_class(t.id());
  size_t size = H5Tget_size(t.id());
  if (cls == H5T_INTEGER) {
    bool is_signed = H5Tget_sign(t.id()) == H5T_SGN_2;
    switch (size) {
      case 1: return is_signed ? StoredType::i8 : StoredType::u8;
      case 2: return is_signed ? StoredType::i16 : StoredType::u16;
      case 4: return is_signed ? StoredType::i32 : StoredType::u32;
      case 8: return is_signed ? StoredType::i64 : StoredType::u64;
    }
  } else if (cls == H5T_FLOAT) {
    if (size == 4) return StoredType::f32;
    if (size == 8) return StoredType::f64;
  }
  return StoredType::other;
}

template <typename T>
std::vector<T> File::read(const std::string& dataset) const {
  Handle d = open_dataset(dataset);
  std::vector<T> out(static_cast<size_t>(numel(dataset)));  // numel() checked the count against the file
  if (!out.empty() && H5Dread(d.id(), native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) < 0)
    throw_hdf5_failure(cat(path_, ": cannot read dataset '", dataset, "'"), kReadHint);
  return out;
}

template <typename T>
void File::read_range(const std::string& dataset, int64_t offset, int64_t count, T* out) const {
  if (count == 0) return;
  Handle d = open_dataset(dataset);
  Handle space(H5Dget_space(d.id()), Handle::Kind::dataspace);
  MOBA_CHECK(H5Sget_simple_extent_ndims(space.id()) == 1,
             cat(path_, ": dataset '", dataset, "' is not 1-D: the file is corrupt or not moba's"), kCorruptHint);
  const hsize_t n = static_cast<hsize_t>(numel(dataset));
  MOBA_CHECK(offset >= 0 && count >= 0 && offset <= INT64_MAX - count && static_cast<hsize_t>(offset + count) <= n,
             cat("read of [", offset, ", ", offset + count, ") past the end of ", dataset, " (", n, ") in ", path_),
             "the dataset is inconsistent (offsets beyond the token array); recreate it with moba prep");
  hsize_t start = static_cast<hsize_t>(offset), cnt = static_cast<hsize_t>(count);
  MOBA_H5_CHECK(H5Sselect_hyperslab(space.id(), H5S_SELECT_SET, &start, nullptr, &cnt, nullptr), "hyperslab",
                kReadHint);
  Handle mem(H5Screate_simple(1, &cnt, nullptr), Handle::Kind::dataspace);
  if (H5Dread(d.id(), native_type<T>(), mem.id(), space.id(), H5P_DEFAULT, out) < 0)
    throw_hdf5_failure(cat(path_, ": cannot read dataset '", dataset, "'"), kReadHint);
}

template <typename T>
void File::write(const std::string& dataset, const T* data, const std::vector<int64_t>& shape) {
  std::string name = norm(dataset);
  size_t slash = name.rfind('/');
  if (slash > 0 && !exists(name.substr(0, slash))) create_group(name.substr(0, slash));
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), Handle::Kind::dataspace);
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  Handle dcpl = n > 0 && !dims.empty() ? checksummed_chunks(chunk_shape(dims)) : Handle();
  Handle d(H5Dcreate2(id(), name.c_str(), native_type<T>(), space.id(), H5P_DEFAULT,
                      dcpl.valid() ? dcpl.id() : H5P_DEFAULT, H5P_DEFAULT),
           Handle::Kind::dataset);
  MOBA_H5_CHECK(d.id(), cat("cannot create dataset ", dataset, " in ", path_), kWriteHint);
  if (n > 0)
    MOBA_H5_CHECK(H5Dwrite(d.id(), native_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
                  cat("cannot write dataset ", dataset, " to ", path_, " (disk full?)"), kWriteHint);
}

bool File::has_attr(const std::string& object, const std::string& key) const {
  Handle o = open_object(object);
  return H5Aexists(o.id(), key.c_str()) > 0;
}

namespace {
void write_attr(hid_t obj, const std::string& key, hid_t type, const void* value, const std::string& where) {
  if (H5Aexists(obj, key.c_str()) > 0) H5Adelete(obj, key.c_str());
  Handle space(H5Screate(H5S_SCALAR), Handle::Kind::dataspace);
  Handle a(H5Acreate2(obj, key.c_str(), type, space.id(), H5P_DEFAULT, H5P_DEFAULT), Handle::Kind::attribute);
  MOBA_H5_CHECK(a.id(), cat("cannot create attribute ", key, " in ", where), kWriteHint);
  MOBA_H5_CHECK(H5Awrite(a.id(), type, value), cat("cannot write attribute ", key, " in ", where), kWriteHint);
}
}  // namespace

void File::set_attr(const std::string& object, const std::string& key, int64_t value) {
  Handle o = open_object(object);
  write_attr(o.id(), key, H5T_NATIVE_INT64, &value, path_);
}
void File::set_attr(const std::string& object, const std::string& key, double value) {
  Handle o = open_object(object);
  write_attr(o.id(), key, H5T_NATIVE_DOUBLE, &value, path_);
}
void File::set_attr(const std::string& object, const std::string& key, const std::string& value) {
  Handle o = open_object(object);
  Handle t(H5Tcopy(H5T_C_S1), Handle::Kind::datatype);
  H5Tset_size(t.id(), std::max<size_t>(1, value.size()));
  H5Tset_strpad(t.id(), H5T_STR_NULLPAD);
  H5Tset_cset(t.id(), H5T_CSET_UTF8);
  std::string padded = value.empty() ? std::string(1, '\0') : value;
  write_attr(o.id(), key, t.id(), padded.data(), path_);
}

namespace {
Handle open_attr(hid_t obj, const std::string& key, const std::string& object, const std::string& path) {
  MOBA_CHECK(H5Aexists(obj, key.c_str()) > 0, cat(path, ": ", object, " has no attribute '", key, "'"),
             "the file is incomplete or from another tool; recreate it");
  Handle a(H5Aopen(obj, key.c_str(), H5P_DEFAULT), Handle::Kind::attribute);
  MOBA_H5_CHECK(a.id(), cat("cannot open attribute ", key, " in ", path), kReadHint);
  return a;
}
}  // namespace

int64_t File::attr_int(const std::string& object, const std::string& key) const {
  Handle o = open_object(object);
  Handle a = open_attr(o.id(), key, object, path_);
  int64_t v = 0;
  MOBA_H5_CHECK(H5Aread(a.id(), H5T_NATIVE_INT64, &v), cat("cannot read attribute ", key, " in ", path_), kReadHint);
  return v;
}

double File::attr_double(const std::string& object, const std::string& key) const {
  Handle o = open_object(object);
  Handle a = open_attr(o.id(), key, object, path_);
  double v = 0;
  MOBA_H5_CHECK(H5Aread(a.id(), H5T_NATIVE_DOUBLE, &v), cat("cannot read attribute ", key, " in ", path_), kReadHint);
  return v;
}

std::string File::attr_string(const std::string& object, const std::string& key) const {
  Handle o = open_object(object);
  Handle a = open_attr(o.id(), key, object, path_);
  Handle t(H5Aget_type(a.id()), Handle::Kind::datatype);
  MOBA_CHECK(H5Tget_class(t.id()) == H5T_STRING, cat(path_, ": attribute ", key, " is not a string"),
             "the file is from another tool; recreate it");
  if (H5Tis_variable_str(t.id()) > 0) {
    char* s = nullptr;
    Handle mt(H5Tcopy(H5T_C_S1), Handle::Kind::datatype);
    H5Tset_size(mt.id(), H5T_VARIABLE);
    MOBA_H5_CHECK(H5Aread(a.id(), mt.id(), &s), cat("cannot read attribute ", key, " in ", path_), kReadHint);
    std::string out = s ? s : "";
    H5free_memory(s);
    return out;
  }
  size_t size = H5Tget_size(t.id());
  std::string out(size, '\0');
  MOBA_H5_CHECK(H5Aread(a.id(), t.id(), out.data()), cat("cannot read attribute ", key, " in ", path_), kReadHint);
  out.resize(std::strlen(out.c_str()));
  return out;
}

void File::flush() {
  MOBA_H5_CHECK(H5Fflush(id(), H5F_SCOPE_GLOBAL), cat("cannot flush ", path_, " (disk full?)"), kWriteHint);
}

template <typename T>
Appender<T>::Appender(File& file, const std::string& dataset, int64_t chunk_elems) : file_(file), name_(norm(dataset)) {
  hsize_t zero = 0, unlimited = H5S_UNLIMITED, chunk = static_cast<hsize_t>(chunk_elems);
  Handle space(H5Screate_simple(1, &zero, &unlimited), Handle::Kind::dataspace);
  Handle dcpl = checksummed_chunks({chunk});
  // The chunk being filled stays in the cache until it is complete, so each chunk is checksummed and written
  // once (with a filter, a chunk evicted half-full is read back, verified and rewritten on every append).
  Handle dapl(H5Pcreate(H5P_DATASET_ACCESS), Handle::Kind::plist);
  MOBA_H5_CHECK(H5Pset_chunk_cache(dapl.id(), 521, 2 * chunk * sizeof(T), 1.0), "chunk cache", kWriteHint);
  dataset_ = Handle(H5Dcreate2(file.id(), name_.c_str(), native_type<T>(), space.id(), H5P_DEFAULT, dcpl.id(),
                               dapl.id()),
                    Handle::Kind::dataset);
  MOBA_H5_CHECK(dataset_.id(), cat("cannot create dataset ", dataset, " in ", file.path()), kWriteHint);
}

template <typename T>
void Appender<T>::append(const T* data, int64_t count) {
  if (count <= 0) return;
  hsize_t new_size = static_cast<hsize_t>(size_ + count);
  MOBA_H5_CHECK(H5Dset_extent(dataset_.id(), &new_size), cat("cannot grow ", name_, " in ", file_.path()), kWriteHint);
  Handle space(H5Dget_space(dataset_.id()), Handle::Kind::dataspace);
  hsize_t start = static_cast<hsize_t>(size_), cnt = static_cast<hsize_t>(count);
  H5Sselect_hyperslab(space.id(), H5S_SELECT_SET, &start, nullptr, &cnt, nullptr);
  Handle mem(H5Screate_simple(1, &cnt, nullptr), Handle::Kind::dataspace);
  MOBA_H5_CHECK(H5Dwrite(dataset_.id(), native_type<T>(), mem.id(), space.id(), H5P_DEFAULT, data),
                cat("cannot append to ", name_, " in ", file_.path(), " (disk full?)"), kWriteHint);
  size_ += count;
}

#define MOBA_H5_INSTANTIATE(T)                                                                  \
  template std::vector<T> File::read<T>(const std::string&) const;                              \
  template void File::read_range<T>(const std::string&, int64_t, int64_t, T*) const;           \
  template void File::write<T>(const std::string&, const T*, const std::vector<int64_t>&);     \
  template class Appender<T>;
MOBA_H5_INSTANTIATE(uint8_t)
MOBA_H5_INSTANTIATE(uint16_t)
MOBA_H5_INSTANTIATE(uint32_t)
MOBA_H5_INSTANTIATE(uint64_t)
MOBA_H5_INSTANTIATE(int32_t)
MOBA_H5_INSTANTIATE(int64_t)
MOBA_H5_INSTANTIATE(float)
MOBA_H5_INSTANTIATE(double)

}  // namespace moba::h5
