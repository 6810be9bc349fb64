//! MNIST from IDX files (optionally gzip-compressed), with no dependency on Burn's `vision`
//! feature.
//!
//! Lookup order: an explicit directory, then `$MNIST_DIR`, then the cache directory
//! (`$XDG_CACHE_HOME/burn-qat/mnist` or `~/.cache/burn-qat/mnist`). Each file may be raw
//! (`train-images-idx3-ubyte`) or gzip (`train-images-idx3-ubyte.gz`). Corrupted, truncated or
//! lying files are errors, never panics, and nothing larger than the file itself is allocated.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The four standard file names.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// SHA-256 of the uncompressed files (identical to the original distribution's bytes).
pub const SHA256: [&str; 4] = [
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
];

/// The public mirror the files are downloaded from (the CVDF mirror that TensorFlow and Burn use).
pub const MIRROR: &str = "https://storage.googleapis.com/cvdf-datasets/mnist/";

/// Image side in pixels.
pub const SIDE: usize = 28;

/// What can go wrong loading MNIST.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DataError {
    /// No directory holds the files.
    #[error(
        "MNIST not found: looked in {searched:?}. Put the four files {FILES:?} (raw or .gz) in one of them, \
         pass --data-dir DIR, or set MNIST_DIR"
    )]
    NotFound {
        /// Directories searched.
        searched: Vec<PathBuf>,
    },
    /// Reading failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A download failed or gave other bytes than MNIST's.
    #[error(
        "could not download MNIST ({reason}). Offline? Put the four files {FILES:?} (raw or .gz) in {dir} \
         (or any directory given by --data-dir or MNIST_DIR)"
    )]
    Download {
        /// Where the files were to go.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The file is not a valid IDX file of the expected kind.
    #[error("{path} is not a valid MNIST {what} file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// `images` or `labels`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// One split: `images[i * 784..(i + 1) * 784]` are the pixels (0..=255) of image `i`.
#[derive(Clone, Debug)]
pub struct Split {
    /// Pixels, row-major, `len = 784 * labels.len()`.
    pub images: Vec<u8>,
    /// Labels 0..=9.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// The first `n` images (all if `n` is larger).
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.len());
        Split {
            images: self.images[..n * SIDE * SIDE].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }
    /// Pixels of images `range`, scaled to `[0, 1]`.
    pub fn pixels(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        self.images[range.start * SIDE * SIDE..range.end * SIDE * SIDE]
            .iter()
            .map(|p| *p as f32 / 255.0)
            .collect()
    }
}

/// The training and test splits.
#[derive(Clone, Debug)]
pub struct Mnist {
    /// 60,000 training images.
    pub train: Split,
    /// 10,000 test images.
    pub test: Split,
    /// Where they were read from.
    pub dir: PathBuf,
}

/// The directories searched, in order.
pub fn search_path(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = explicit {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("MNIST_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(cache_dir());
    dirs
}

/// `$XDG_CACHE_HOME/burn-qat/mnist`, or `~/.cache/burn-qat/mnist`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("burn-qat").join("mnist")
}

fn file_in(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

impl Mnist {
    /// Loads MNIST from the first directory of [`search_path`] that holds all four files.
    pub fn load(explicit: Option<&Path>) -> Result<Mnist, DataError> {
        let searched = search_path(explicit);
        for dir in &searched {
            if FILES.iter().all(|f| file_in(dir, f).is_some()) {
                return Self::load_dir(dir);
            }
        }
        Err(DataError::NotFound { searched })
    }

    /// Like [`load`](Self::load), but when no directory has the files, downloads them from
    /// [`MIRROR`] into [`cache_dir`], verifying their SHA-256, then loads them.
    pub fn load_or_download(explicit: Option<&Path>) -> Result<Mnist, DataError> {
        match Self::load(explicit) {
            Err(DataError::NotFound { .. }) => {
                let dir = cache_dir();
                download(&dir)?;
                Self::load_dir(&dir)
            }
            other => other,
        }
    }

    /// Loads the four files from `dir`.
    pub fn load_dir(dir: &Path) -> Result<Mnist, DataError> {
        let path = |name: &str| {
            file_in(dir, name).ok_or_else(|| DataError::NotFound {
                searched: vec![dir.to_path_buf()],
            })
        };
        let train = Split {
            images: read_images(&path(FILES[0])?)?,
            labels: read_labels(&path(FILES[1])?)?,
        };
        let test = Split {
            images: read_images(&path(FILES[2])?)?,
            labels: read_labels(&path(FILES[3])?)?,
        };
        for (name, split) in [("train", &train), ("test", &test)] {
            if split.images.len() != split.labels.len() * SIDE * SIDE {
                return Err(DataError::Invalid {
                    path: dir.to_path_buf(),
                    what: "images",
                    reason: format!(
                        "the {name} split has {} images but {} labels",
                        split.images.len() / (SIDE * SIDE),
                        split.labels.len()
                    ),
                });
            }
        }
        Ok(Mnist {
            train,
            test,
            dir: dir.to_path_buf(),
        })
    }
}

/// Downloads the four files into `dir` (as raw IDX), verifying each file's SHA-256 before it is
/// written; a failure leaves no partial file behind.
pub fn download(dir: &Path) -> Result<(), DataError> {
    use sha2::Digest;
    let fail = |reason: String| DataError::Download {
        dir: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    for (name, sha) in FILES.iter().zip(SHA256) {
        let target = dir.join(name);
        if target.is_file() {
            continue;
        }
        let url = format!("{MIRROR}{name}.gz");
        eprintln!("downloading {url}");
        let response = ureq::get(&url)
            .call()
            .map_err(|e| fail(format!("{url}: {e}")))?;
        let mut gz = Vec::new();
        response
            .into_body()
            .into_reader()
            .take(20_000_000)
            .read_to_end(&mut gz)
            .map_err(|e| fail(format!("{url}: {e}")))?;
        let mut raw = Vec::new();
        flate2::read::MultiGzDecoder::new(gz.as_slice())
            .take(16 + MAX_IMAGES * (SIDE * SIDE) as u64)
            .read_to_end(&mut raw)
            .map_err(|e| fail(format!("{url}: not gzip: {e}")))?;
        let got = format!("{:x}", sha2::Sha256::digest(&raw));
        if got != sha {
            return Err(fail(format!("{url}: SHA-256 {got}, expected {sha}")));
        }
        let tmp = dir.join(format!("{name}.part"));
        std::fs::write(&tmp, &raw).map_err(|e| fail(format!("writing {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &target)
            .map_err(|e| fail(format!("writing {}: {e}", target.display())))?;
    }
    Ok(())
}

/// Reads a whole file, gunzipping `.gz`, refusing more than `limit` bytes of content.
fn read_all(path: &Path, limit: u64) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut out = Vec::new();
    let gz = path.extension().is_some_and(|e| e == "gz");
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    reader.take(limit + 1).read_to_end(&mut out).map_err(io)?;
    if out.len() as u64 > limit {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            what: "IDX",
            reason: format!("more than {limit} bytes: not an MNIST file"),
        });
    }
    Ok(out)
}

const MAX_IMAGES: u64 = 60_000;

fn header(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
    magic: u32,
    len: usize,
) -> Result<usize, DataError> {
    let invalid = |reason: String| DataError::Invalid {
        path: path.to_path_buf(),
        what,
        reason,
    };
    if bytes.len() < len {
        return Err(invalid(format!(
            "{} bytes, shorter than its {len}-byte header (truncated?)",
            bytes.len()
        )));
    }
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if word(0) != magic {
        return Err(invalid(format!(
            "magic number {:#010x}, expected {magic:#010x}",
            word(0)
        )));
    }
    let count = word(4) as u64;
    if count > MAX_IMAGES {
        return Err(invalid(format!(
            "header claims {count} items, MNIST has at most {MAX_IMAGES}"
        )));
    }
    if what == "images" && (word(8) != SIDE as u32 || word(12) != SIDE as u32) {
        return Err(invalid(format!(
            "images of {}x{}, expected {SIDE}x{SIDE}",
            word(8),
            word(12)
        )));
    }
    let item = if what == "images" { SIDE * SIDE } else { 1 };
    let need = len + count as usize * item;
    if bytes.len() != need {
        return Err(invalid(format!(
            "header claims {count} items ({need} bytes) but the file holds {} bytes (truncated or corrupted)",
            bytes.len()
        )));
    }
    Ok(count as usize)
}

/// Reads an IDX3 image file (`0x00000803`, 28x28 u8 images).
pub fn read_images(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_all(path, 16 + MAX_IMAGES * (SIDE * SIDE) as u64)?;
    header(&bytes, path, "images", 0x0000_0803, 16)?;
    Ok(bytes[16..].to_vec())
}

/// Reads an IDX1 label file (`0x00000801`, u8 labels 0..=9).
pub fn read_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_all(path, 8 + MAX_IMAGES)?;
    header(&bytes, path, "labels", 0x0000_0801, 8)?;
    if let Some(bad) = bytes[8..].iter().find(|l| **l > 9) {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            what: "labels",
            reason: format!("label {bad} is not a digit"),
        });
    }
    Ok(bytes[8..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn images(count: u32, actual: usize) -> Vec<u8> {
        let mut b = vec![0, 0, 8, 3];
        b.extend(count.to_be_bytes());
        b.extend(28u32.to_be_bytes());
        b.extend(28u32.to_be_bytes());
        b.extend(vec![7u8; actual * 784]);
        b
    }

    #[test]
    fn reads_valid_and_gz_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a", &images(2, 2));
        assert_eq!(read_images(&p).unwrap().len(), 2 * 784);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&images(1, 1)).unwrap();
        let p = write(dir.path(), "b.gz", &gz.finish().unwrap());
        assert_eq!(read_images(&p).unwrap().len(), 784);
    }

    #[test]
    fn truncated_lying_and_corrupted_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t", &images(3, 2));
        let e = read_images(&p).unwrap_err().to_string();
        assert!(
            e.contains("header claims 3 items (2368 bytes) but the file holds 1584 bytes"),
            "{e}"
        );
        // A header claiming billions of images: rejected before any allocation of that size.
        let p = write(dir.path(), "l", &images(4_000_000_000, 1));
        let e = read_images(&p).unwrap_err().to_string();
        assert!(
            e.contains("header claims 4000000000 items, MNIST has at most 60000"),
            "{e}"
        );
        let p = write(dir.path(), "s", &[0, 0, 8]);
        let e = read_images(&p).unwrap_err().to_string();
        assert!(e.contains("shorter than its 16-byte header"), "{e}");
        let mut bad = images(1, 1);
        bad[3] = 1;
        let p = write(dir.path(), "m", &bad);
        assert!(
            read_images(&p)
                .unwrap_err()
                .to_string()
                .contains("magic number 0x00000801, expected 0x00000803")
        );
        let p = write(dir.path(), "g.gz", b"not gzip at all");
        assert!(matches!(read_images(&p).unwrap_err(), DataError::Io { .. }));
        let p = write(dir.path(), "lab", &[0, 0, 8, 1, 0, 0, 0, 2, 3, 12]);
        assert!(
            read_labels(&p)
                .unwrap_err()
                .to_string()
                .contains("label 12 is not a digit")
        );
    }

    #[test]
    fn missing_directory_names_the_files() {
        let dir = tempfile::tempdir().unwrap();
        // load_dir, not load: $MNIST_DIR (set in CI) must not make this directory's files appear.
        let e = Mnist::load_dir(dir.path())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("MNIST not found: looked in"), "{e}");
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("--data-dir"),
            "{e}"
        );
    }
}
