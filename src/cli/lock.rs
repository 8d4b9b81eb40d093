//! Lock files: the ABI fingerprints of a user's released type versions, so that user types are
//! pinned the way built-in ones are (`device-model/abi/released.toml`).
//!
//! `vgpu-emu lock` records `NAME@VERSION = "sha256:..."` for every version the `--types-file`s
//! define, in `FILE.lock` beside the one type file or in `--lock-file LOCK`; it only ever adds
//! lines. Every command that loads type files then checks each lock that applies: the one named
//! by `--lock-file` (covering every `--types-file`) and each `FILE.lock` that exists beside a
//! type file (covering that file). A locked version must still be defined by a covered file with
//! the same fingerprint; a version that is not locked is simply not released yet.
//!
//! ```toml
//! # (a header comment saying what the file is)
//! [locked]
//! "LAB-32M@1" = "sha256:3fa2..."
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use vgpu_model::fingerprint::fingerprint;
use vgpu_model::{Catalog, VgpuType};

use crate::error::CliError;

/// Largest lock file read, as for type files: far above any real lock (one short line per
/// version), small enough that `/dev/zero` is refused at once.
pub const MAX_LOCK_FILE: u64 = 1 << 20;

/// Why a lock file cannot be used, or why the types do not match it. All are bad input.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be read.
    #[error("cannot read lock file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The lock file is larger than any lock file could be.
    #[error("lock file {} is larger than {} KiB; it cannot be a lock file", path.display(), limit >> 10)]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The most bytes read.
        limit: u64,
    },
    /// The lock file is not a valid lock file.
    #[error("invalid lock file: {file}:{line}: {message}")]
    Syntax {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A locked version is defined with another fingerprint.
    #[error("{0}")]
    Changed(Box<Changed>),
    /// A locked version is no longer defined.
    #[error(
        "{key} is locked in {} but no longer defined in {files}: a released version is never \
         deleted; keep it, with `deprecated = true` to retire it",
        lock.display()
    )]
    Missing {
        /// `NAME@VERSION`.
        key: String,
        /// The lock file.
        lock: PathBuf,
        /// The type files the lock covers.
        files: String,
    },
    /// A lock file is named but no type file is given.
    #[error(
        "a lock file holds the fingerprints of the types in type files, but no --types-file is \
         given"
    )]
    NoTypesFile,
    /// `lock` with several type files and no `--lock-file`.
    #[error(
        "{count} type files are given: name the one lock file for all of them with --lock-file \
         LOCK"
    )]
    NeedsLockFile {
        /// How many type files.
        count: usize,
    },
}

impl LockError {
    /// Lines to print after the error.
    pub fn hints(&self) -> Vec<String> {
        match self {
            LockError::Changed(c) => {
                let (key, next) = (&c.key, &c.next);
                vec![
                    format!(
                        "restore {key} as it was when locked and make the change in a new type \
                         record {next}"
                    ),
                    format!(
                        "then `vgpu-emu lock` (with the same --types-file and --lock-file) adds \
                         {next}; it never changes an entry"
                    ),
                ]
            }
            _ => Vec::new(),
        }
    }
}

/// A locked version defined with another fingerprint than the one locked.
#[derive(Debug)]
pub struct Changed {
    /// The type file that defines the version now.
    pub types_file: String,
    /// `NAME@VERSION`.
    pub key: String,
    /// The lock file.
    pub lock: PathBuf,
    /// The fingerprint in the lock file.
    pub locked: String,
    /// The fingerprint of the version as defined now.
    pub now: String,
    /// The version to add instead: one past the newest of that name.
    pub next: String,
}

impl fmt::Display for Changed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} changed after it was locked in {} (fingerprint {} now {}): a released \
             version never changes; add {} instead",
            self.types_file,
            self.key,
            self.lock.display(),
            self.locked,
            self.now,
            self.next
        )
    }
}

/// One locked version, `NAME@VERSION`; ordered by name, then by version number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LockKey {
    /// Type name as written.
    pub name: String,
    /// Version.
    pub version: u32,
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl LockKey {
    fn of(ty: &VgpuType) -> LockKey {
        LockKey {
            name: ty.name.clone(),
            version: ty.version,
        }
    }

    /// Whether `ty` is this version (names match case-insensitively, as everywhere).
    fn names(&self, ty: &VgpuType) -> bool {
        ty.version == self.version && ty.name.eq_ignore_ascii_case(&self.name)
    }
}

/// The contents of a lock file: locked version -> `sha256:...`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockFile {
    /// The entries, sorted.
    pub entries: BTreeMap<LockKey, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLock {
    locked: BTreeMap<Spanned<String>, Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn parse_key(key: &str) -> Result<LockKey, String> {
    let bad = |why: &str| format!("key `{key}` {why}; write \"NAME@VERSION\" (e.g. \"LAB-32M@1\")");
    let (name, version) = key.split_once('@').ok_or_else(|| bad("has no `@`"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad("is not a type name and version"));
    }
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("has no version number"));
    }
    let version = version
        .parse()
        .map_err(|_| bad("has a version that is too large"))?;
    Ok(LockKey {
        name: name.to_string(),
        version,
    })
}

fn valid_fingerprint(value: &str) -> bool {
    value.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl LockFile {
    /// Parses a lock file; `file` names it in errors, which give its line.
    pub fn parse(file: &str, text: &str) -> Result<LockFile, LockError> {
        let err = |span: Range<usize>, message: String| LockError::Syntax {
            file: file.to_string(),
            line: line_of(text, span.start),
            message,
        };
        let raw: RawLock = toml::from_str(text)
            .map_err(|e| err(e.span().unwrap_or(0..0), e.message().trim().to_string()))?;
        let mut entries = BTreeMap::new();
        for (key, value) in raw.locked {
            let parsed = parse_key(key.get_ref()).map_err(|m| err(key.span(), m))?;
            if !valid_fingerprint(value.get_ref()) {
                return Err(err(
                    value.span(),
                    format!(
                        "`{}` = \"{}\" is not an ABI fingerprint (sha256: and 64 lowercase hex digits)",
                        key.get_ref(),
                        value.get_ref()
                    ),
                ));
            }
            if let Some(other) = entries
                .keys()
                .find(|k: &&LockKey| {
                    k.version == parsed.version && k.name.eq_ignore_ascii_case(&parsed.name)
                })
                .cloned()
            {
                return Err(err(
                    key.span(),
                    format!("`{parsed}` is locked twice (also as `{other}`)"),
                ));
            }
            entries.insert(parsed, value.into_inner());
        }
        Ok(LockFile { entries })
    }

    /// The fingerprint locked for `ty`, if it is locked.
    pub fn get(&self, ty: &VgpuType) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k.names(ty))
            .map(|(_, v)| v.as_str())
    }

    /// The file's text: a header naming the type files it pins, then the entries, sorted.
    pub fn render(&self, covers: &[PathBuf]) -> String {
        let names: Vec<String> = covers
            .iter()
            .map(|p| {
                p.file_name()
                    .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
            })
            .collect();
        let mut out = format!(
            "# vgpu-emu lock file: the ABI fingerprints of the released versions of the vGPU types\n\
             # in {}, written by `vgpu-emu lock`, which only ever adds lines.\n\
             # A released version never changes and is never deleted: vgpu-emu refuses to load a\n\
             # locked version whose fingerprint differs or that is gone. To change a type, add a new\n\
             # version of it and run `vgpu-emu lock` again. Never edit or remove a line.\n\
             \n[locked]\n",
            names.join(", ")
        );
        for (k, v) in &self.entries {
            out.push_str(&format!("\"{k}\" = \"{v}\"\n"));
        }
        out
    }
}

/// Fuzz entry point for lock files, a local user's input: parses `data`; what parses must
/// render and parse back to the same entries, and a refusal must name the file and a line that
/// exists.
#[doc(hidden)]
pub fn fuzz_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match LockFile::parse("fuzz.lock", &text) {
        Ok(lock) => {
            let again = LockFile::parse("again.lock", &lock.render(&[]))
                .expect("a rendered lock file parses");
            assert_eq!(again, lock, "render and parse round-trip");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("fuzz.lock"),
                "the error names the file: {message}"
            );
        }
    }
}

/// The lock file used beside a type file: `FILE.lock` (`lab.toml` -> `lab.toml.lock`).
pub fn path_beside(types_file: &Path) -> PathBuf {
    let mut p = types_file.as_os_str().to_os_string();
    p.push(".lock");
    PathBuf::from(p)
}

/// Reads a lock file of at most [`MAX_LOCK_FILE`] bytes; `None` when it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, LockError> {
    let io = |source| LockError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_LOCK_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_LOCK_FILE {
        return Err(LockError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_LOCK_FILE,
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Reads and parses a lock file; `None` when it does not exist.
pub fn read(path: &Path) -> Result<Option<LockFile>, LockError> {
    read_text(path)?
        .map(|text| LockFile::parse(&path.display().to_string(), &text))
        .transpose()
}

/// A lock file and the type files it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// The lock file.
    pub path: PathBuf,
    /// The type files whose versions it pins.
    pub covers: Vec<PathBuf>,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The locks that apply to `types_files`: `explicit` (`--lock-file`, covering all of them) and
/// each `FILE.lock` that exists beside one (covering that file; when it is `explicit` itself,
/// the wider coverage is kept).
pub fn applicable(types_files: &[PathBuf], explicit: Option<&Path>) -> Vec<Lock> {
    let mut locks = Vec::new();
    if let Some(path) = explicit {
        locks.push(Lock {
            path: path.to_path_buf(),
            covers: types_files.to_vec(),
        });
    }
    for file in types_files {
        let path = path_beside(file);
        if std::fs::symlink_metadata(&path).is_err()
            || explicit.is_some_and(|e| same_file(e, &path))
        {
            continue;
        }
        locks.push(Lock {
            path,
            covers: vec![file.clone()],
        });
    }
    locks
}

/// Which user type versions the checked locks hold fixed: type key -> lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locked(BTreeMap<String, PathBuf>);

impl Locked {
    /// The lock file that holds `ty` fixed, if one does.
    pub fn lock_of(&self, ty: &VgpuType) -> Option<&Path> {
        self.0.get(&ty.key()).map(PathBuf::as_path)
    }
}

/// The type versions `covers` define.
fn covered<'a>(catalog: &'a Catalog, covers: &[PathBuf]) -> Vec<&'a VgpuType> {
    let sources: Vec<String> = covers.iter().map(|p| p.display().to_string()).collect();
    catalog
        .types()
        .iter()
        .filter(|t| sources.contains(&t.source))
        .collect()
}

fn display_files(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "no type file".into();
    }
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that every version `file` locks is defined by `lock.covers` with its fingerprint,
/// and records them in `held`.
pub fn verify(
    catalog: &Catalog,
    lock: &Lock,
    file: &LockFile,
    held: &mut Locked,
) -> Result<(), LockError> {
    let types = covered(catalog, &lock.covers);
    for (key, locked) in &file.entries {
        let Some(ty) = types.iter().find(|t| key.names(t)) else {
            return Err(LockError::Missing {
                key: key.to_string(),
                lock: lock.path.clone(),
                files: display_files(&lock.covers),
            });
        };
        let now = fingerprint(ty).to_string();
        if now != *locked {
            let newest = catalog
                .types()
                .iter()
                .filter(|t| t.name.eq_ignore_ascii_case(&ty.name))
                .map(|t| t.version)
                .max()
                .unwrap_or(ty.version);
            return Err(LockError::Changed(Box::new(Changed {
                types_file: ty.source.clone(),
                key: ty.key(),
                lock: lock.path.clone(),
                locked: locked.clone(),
                now,
                next: format!("{}@{}", ty.name, newest.saturating_add(1)),
            })));
        }
        held.0.insert(ty.key(), lock.path.clone());
    }
    Ok(())
}

/// Checks every lock that applies to `types_files` (see [`applicable`]) and returns what they
/// hold fixed. A named lock file must exist; a lock file with no type file is refused.
pub fn verify_all(
    catalog: &Catalog,
    types_files: &[PathBuf],
    explicit: Option<&Path>,
) -> Result<Locked, LockError> {
    let mut locked = Locked::default();
    if explicit.is_some() && types_files.is_empty() {
        return Err(LockError::NoTypesFile);
    }
    for lock in applicable(types_files, explicit) {
        let file = read(&lock.path)?.ok_or_else(|| LockError::Read {
            path: lock.path.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        })?;
        verify(catalog, &lock, &file, &mut locked)?;
    }
    Ok(locked)
}

/// `vgpu-emu lock`: adds every version `types_files` define that is not locked yet to the lock
/// file (`explicit`, else `FILE.lock` beside the one type file), after checking the entries it
/// has (and any other lock that applies). Returns what to print.
pub fn lock(
    catalog: &Catalog,
    types_files: &[PathBuf],
    explicit: Option<&Path>,
) -> Result<String, CliError> {
    let target = match (explicit, types_files) {
        (_, []) => return Err(LockError::NoTypesFile.into()),
        (Some(p), _) => p.to_path_buf(),
        (None, [one]) => path_beside(one),
        (None, many) => return Err(LockError::NeedsLockFile { count: many.len() }.into()),
    };
    for other in applicable(types_files, None) {
        if same_file(&other.path, &target) {
            continue;
        }
        if let Some(file) = read(&other.path)? {
            verify(catalog, &other, &file, &mut Locked::default())?;
        }
    }
    let existed = read(&target)?;
    let mut file = existed.clone().unwrap_or_default();
    let here = Lock {
        path: target.clone(),
        covers: types_files.to_vec(),
    };
    verify(catalog, &here, &file, &mut Locked::default())?;
    let mut out = String::new();
    for ty in covered(catalog, types_files) {
        if file.get(ty).is_none() {
            let fp = fingerprint(ty).to_string();
            out.push_str(&format!("locked {} {fp}\n", ty.key()));
            file.entries.insert(LockKey::of(ty), fp);
        }
    }
    if existed.is_some() && out.is_empty() {
        return Ok(format!(
            "nothing to add: {} already locks every version ({})\n",
            target.display(),
            file.entries.len()
        ));
    }
    write_atomically(&target, file.render(types_files).as_bytes())?;
    out.push_str(&format!(
        "wrote {} ({} locked version(s))\n",
        target.display(),
        file.entries.len()
    ));
    Ok(out)
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`, so a reader
/// never sees half a lock file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let output = |source| CliError::Output {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| output(std::io::ErrorKind::InvalidInput.into()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP_A: &str = "sha256:3fa2000000000000000000000000000000000000000000000000000000000001";
    const FP_B: &str = "sha256:91bc000000000000000000000000000000000000000000000000000000000002";

    fn key(name: &str, version: u32) -> LockKey {
        LockKey {
            name: name.into(),
            version,
        }
    }

    fn syntax(text: &str) -> (usize, String) {
        match LockFile::parse("lab.toml.lock", text) {
            Err(LockError::Syntax {
                file,
                line,
                message,
            }) => {
                assert_eq!(file, "lab.toml.lock");
                (line, message)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn render_sorts_by_version_number_and_parses_back() {
        let mut f = LockFile::default();
        for (k, fp) in [
            (key("LAB-32M", 10), FP_A),
            (key("LAB-32M", 2), FP_B),
            (key("B-TYPE", 1), FP_A),
        ] {
            f.entries.insert(k, fp.into());
        }
        let text = f.render(&[PathBuf::from("some/dir/lab.toml")]);
        assert!(text.starts_with("# vgpu-emu lock file"), "{text}");
        assert!(text.contains("types\n# in lab.toml,"), "{text}");
        assert!(text.contains("never changes"), "{text}");
        let body: Vec<&str> = text.lines().skip_while(|l| *l != "[locked]").collect();
        assert_eq!(
            body,
            [
                "[locked]",
                &format!("\"B-TYPE@1\" = \"{FP_A}\"")[..],
                &format!("\"LAB-32M@2\" = \"{FP_B}\""),
                &format!("\"LAB-32M@10\" = \"{FP_A}\""),
            ]
        );
        assert_eq!(LockFile::parse("x", &text).unwrap(), f);
        let empty = LockFile::default().render(&[]);
        assert_eq!(LockFile::parse("x", &empty).unwrap(), LockFile::default());
    }

    #[test]
    fn parse_refuses_bad_input_with_its_line() {
        let ok = format!("# c\n[locked]\n\"LAB-32M@1\" = \"{FP_A}\"\n");
        let f = LockFile::parse("x", &ok).unwrap();
        assert_eq!(f.entries[&key("LAB-32M", 1)], FP_A);

        let (line, m) = syntax(&format!("{ok}\"LAB-32M@2\" = \"sha256:12\"\n"));
        assert_eq!(line, 4);
        assert!(m.contains("is not an ABI fingerprint"), "{m}");
        let (line, m) = syntax(&format!("{ok}\"LAB-32M\" = \"{FP_B}\"\n"));
        assert_eq!(line, 4);
        assert!(m.contains("key `LAB-32M` has no `@`"), "{m}");
        let (line, m) = syntax(&format!("{ok}\"LAB-32M@v2\" = \"{FP_B}\"\n"));
        assert_eq!(line, 4);
        assert!(m.contains("has no version number"), "{m}");
        let (line, m) = syntax(&format!("{ok}\"LAB 32M@2\" = \"{FP_B}\"\n"));
        assert_eq!(line, 4);
        assert!(m.contains("is not a type name"), "{m}");
        let (line, m) = syntax(&format!("{ok}\"lab-32m@1\" = \"{FP_B}\"\n"));
        assert_eq!(line, 4);
        assert!(m.contains("locked twice"), "{m}");
        let (line, m) = syntax(&format!("{ok}\"LAB-32M@2\" = 7\n"));
        assert_eq!(line, 4);
        assert!(m.contains("invalid type"), "{m}");
        let (line, m) = syntax(&format!("{ok}[extra]\n"));
        assert_eq!(line, 4);
        assert!(m.contains("unknown field `extra`"), "{m}");
        let (line, m) = syntax(&format!("{ok}\"LAB-32M@1\" = \"{FP_A}\"\n"));
        assert_eq!(line, 4);
        assert!(m.contains("duplicate key"), "{m}");
        let (_, m) = syntax("# nothing\n");
        assert!(m.contains("missing field `locked`"), "{m}");
        let (line, _) = syntax("[locked]\n\n\"unterminated\n");
        assert_eq!(line, 3);
    }

    #[test]
    fn the_lock_beside_a_file_appends_lock() {
        assert_eq!(
            path_beside(Path::new("dir/lab.toml")),
            PathBuf::from("dir/lab.toml.lock")
        );
    }
}
