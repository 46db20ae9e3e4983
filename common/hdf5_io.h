// Thin RAII layer over the HDF5 C API, used by datasets, checkpoints and test vectors.
// Every failure becomes a moba::Error that names the file and the object; HDF5's own stack printing is off.
// Files are written so that corruption is detected on read: the 1.10 file format (checksums on every piece of
// metadata: superblock, object headers with their attributes, chunk indexes) and chunked datasets with
// HDF5's Fletcher32 filter (a checksum per chunk, verified on every read).
// Invariant: handles close in destructors; a File opened for reading is never written; every non-empty
// dataset this layer creates carries a checksum, and a checksum mismatch on read is a moba::Error naming the
// file and the dataset, never data.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace moba::h5 {

// Native HDF5 memory type for a C++ element type.
template <typename T> hid_t native_type();
template <> inline hid_t native_type<uint8_t>() { return H5T_NATIVE_UINT8; }
template <> inline hid_t native_type<uint16_t>() { return H5T_NATIVE_UINT16; }
template <> inline hid_t native_type<uint32_t>() { return H5T_NATIVE_UINT32; }
template <> inline hid_t native_type<uint64_t>() { return H5T_NATIVE_UINT64; }
template <> inline hid_t native_type<int32_t>() { return H5T_NATIVE_INT32; }
template <> inline hid_t native_type<int64_t>() { return H5T_NATIVE_INT64; }
template <> inline hid_t native_type<float>() { return H5T_NATIVE_FLOAT; }
template <> inline hid_t native_type<double>() { return H5T_NATIVE_DOUBLE; }

// Stored element kind of a dataset, for validation ("tokens must be uint16 or uint32").
enum class StoredType { u8, u16, u32, u64, i8, i16, i32, i64, f32, f64, other };
const char* stored_type_name(StoredType t);

// Owns one hid_t and closes it with the matching H5*close.
class Handle {
 public:
  enum class Kind { file, dataset, dataspace, group, attribute, datatype, plist };
  Handle() = default;
  Handle(hid_t id, Kind kind) : id_(id), kind_(kind) {}
  Handle(Handle&& o) noexcept : id_(o.id_), kind_(o.kind_) { o.id_ = -1; }
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { close(); }
  void close();
  hid_t id() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = -1;
  Kind kind_ = Kind::file;
};

class File {
 public:
  // Opens an existing file read-only. Errors name the path and say whether it is missing or not HDF5
  // (a truncated or corrupt file reads as "not a valid HDF5 file").
  static File open_read(const std::string& path);
  // Opens an existing file read-write.
  static File open_write(const std::string& path);
  // Creates (truncating) a file.
  static File create(const std::string& path);

  const std::string& path() const { return path_; }
  hid_t id() const { return file_.id(); }

  bool exists(const std::string& name) const;  // a dataset or group at this path ("/a/b" or "a/b")
  bool is_group(const std::string& name) const;  // an existing object that is a group (not a dataset)
  void create_group(const std::string& name);  // creates intermediate groups too
  std::vector<std::string> list(const std::string& group = "/") const;  // child names, sorted

  std::vector<int64_t> shape(const std::string& dataset) const;
  // True when the dataset's chunks carry a Fletcher32 checksum (false for files written before moba did so).
  bool has_checksum(const std::string& dataset) const;
  int64_t numel(const std::string& dataset) const;
  StoredType stored_type(const std::string& dataset) const;

  // Reads the whole dataset converted to T (HDF5 converts numeric types).
  template <typename T> std::vector<T> read(const std::string& dataset) const;
  // Reads elements [offset, offset+count) of a 1-D dataset into out.
  template <typename T> void read_range(const std::string& dataset, int64_t offset, int64_t count, T* out) const;
  // Writes a dataset of the given shape (created; an existing one of that name is an error), chunked with a
  // Fletcher32 checksum per chunk (datasets with no elements are stored plain: there is nothing to check).
  template <typename T>
  void write(const std::string& dataset, const T* data, const std::vector<int64_t>& shape);
  template <typename T>
  void write(const std::string& dataset, const std::vector<T>& data) {
    write(dataset, data.data(), {static_cast<int64_t>(data.size())});
  }

  // Attributes on a dataset or group ("/" for the file itself).
  bool has_attr(const std::string& object, const std::string& key) const;
  void set_attr(const std::string& object, const std::string& key, int64_t value);
  void set_attr(const std::string& object, const std::string& key, double value);
  void set_attr(const std::string& object, const std::string& key, const std::string& value);
  int64_t attr_int(const std::string& object, const std::string& key) const;
  double attr_double(const std::string& object, const std::string& key) const;
  std::string attr_string(const std::string& object, const std::string& key) const;

  void flush();
  void close() { file_.close(); }

 private:
  File(Handle h, std::string path) : file_(std::move(h)), path_(std::move(path)) {}
  Handle open_dataset(const std::string& dataset) const;
  Handle open_object(const std::string& object) const;
  Handle file_;
  std::string path_;
};

// Streams a growing 1-D dataset (chunked, unlimited, Fletcher32 per chunk) so large token arrays never sit in
// memory twice.
template <typename T>
class Appender {
 public:
  Appender(File& file, const std::string& dataset, int64_t chunk_elems = 1 << 20);
  void append(const T* data, int64_t count);
  int64_t size() const { return size_; }

 private:
  File& file_;
  std::string name_;
  Handle dataset_;
  int64_t size_ = 0;
};

}  // namespace moba::h5
