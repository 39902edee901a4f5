//! The sans-IO core of the export: which ledger positions go into which file, the file names,
//! the manifest and the checkpoint rule. No files, no clock, no store: the shell feeds it the
//! positions it can read and carries out the [`Action`]s it returns, in order.
//!
//! The rule that makes the export exactly once (docs/decisions/0050):
//! 1. a plan (a contiguous range of positions, one posting day) is saved in the manifest as
//!    `pending` **before** any file of it is written;
//! 2. each file of the plan is written to a temporary name, fsynced and renamed;
//! 3. only then the manifest moves the checkpoint (`last_position`) to the plan's end and lists
//!    the files.
//!
//! The ledger is append-only, so the rows of a range never change: after a crash at any step the
//! shell re-creates the pending plan's files from the same rows, which gives the same bytes
//! under the same names. No file is ever written outside a saved plan, so nothing past the
//! checkpoint can be left behind for a later, different plan to overlap.

use serde::{Deserialize, Serialize};

/// The version of the exported files' schema, written into each file's metadata.
pub const SCHEMA_VERSION: u32 = 1;

/// The manifest's file name, at the root of the export directory.
pub const MANIFEST: &str = "manifest.json";

/// Temporary files start with this; the shell removes them when it starts.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The default and largest number of ledger positions in one file.
pub const MAX_ROWS_PER_FILE: u64 = 100_000;

/// How the files are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Apache Parquet, decimals as DECIMAL(38, 18).
    Parquet,
    /// One JSON object a line, decimals as strings.
    Ndjson,
}

impl Format {
    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Ndjson => "ndjson",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "parquet" => Ok(Format::Parquet),
            "ndjson" => Ok(Format::Ndjson),
            other => Err(format!(
                "unknown export format {other:?} (parquet or ndjson)"
            )),
        }
    }
}

/// The two data sets every plan writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dataset {
    /// One row per ledger transfer.
    Transfers,
    /// The plan's usage summed per customer, meter, dimensions, period and hour.
    UsageHourly,
}

impl Dataset {
    /// Both, in the order they are written.
    pub const ALL: [Dataset; 2] = [Dataset::Transfers, Dataset::UsageHourly];

    /// The directory and file-name stem.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Transfers => "transfers",
            Dataset::UsageHourly => "usage_hourly",
        }
    }
}

/// A contiguous range of ledger positions posted on one UTC day: the rows of one file per data
/// set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The first position, inclusive.
    pub first: u64,
    /// The last position, inclusive.
    pub last: u64,
    /// `YYYY-MM-DD`, the UTC day the rows were posted.
    pub date: String,
}

impl Plan {
    /// The file's path relative to the export directory: `transfers/date=2026-12-02/
    /// transfers-00000000000000000001-00000000000000000100.parquet`. Zero-padded so that names
    /// sort by position.
    pub fn path(&self, dataset: Dataset, format: Format) -> String {
        format!(
            "{d}/date={date}/{d}-{first:020}-{last:020}.{ext}",
            d = dataset.name(),
            date = self.date,
            first = self.first,
            last = self.last,
            ext = format.extension()
        )
    }

    /// Rows (positions) it covers.
    pub fn len(&self) -> u64 {
        self.last - self.first + 1
    }

    /// Never true: a plan covers at least one position.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// One written file, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the export directory.
    pub path: String,
    /// Which data set.
    pub dataset: Dataset,
    /// First ledger position covered.
    pub first_position: u64,
    /// Last ledger position covered.
    pub last_position: u64,
    /// Rows in the file.
    pub rows: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// The manifest: the checkpoint and every file written. Saved atomically by the shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`SCHEMA_VERSION`] of the files.
    pub schema_version: u32,
    /// Their encoding; one export directory holds one format.
    pub format: Format,
    /// The checkpoint: every position up to this one is in a listed file, none after it is.
    pub last_position: u64,
    /// The plan being written, if any: re-created exactly after a crash.
    pub pending: Option<Plan>,
    /// Every file, in position order.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// An empty export.
    pub fn new(format: Format) -> Self {
        Manifest {
            schema_version: SCHEMA_VERSION,
            format,
            last_position: 0,
            pending: None,
            files: Vec::new(),
        }
    }
}

/// Refusals of the core: input the shell read from disk or the store that cannot be right.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The manifest on disk is of another format or a newer schema.
    #[error(
        "the export directory holds {found:?} schema {version}; this build writes {wanted:?} schema {SCHEMA_VERSION}"
    )]
    Incompatible {
        /// Format found.
        found: Format,
        /// Schema version found.
        version: u32,
        /// Format asked for.
        wanted: Format,
    },
    /// The store returned positions that do not follow the checkpoint one by one.
    #[error("ledger position {got} follows checkpoint {after}; expected {}", after + 1)]
    Gap {
        /// The checkpoint or the previous position.
        after: u64,
        /// The position received.
        got: u64,
    },
}

/// What the shell must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove every file whose name starts with [`TEMP_PREFIX`] (left by a crash).
    RemoveTemps,
    /// Save the manifest atomically (temporary name, fsync, rename, fsync the directory).
    SaveManifest(Manifest),
    /// Encode the rows `plan.first..=plan.last` of `dataset` and write them to `path` through a
    /// temporary name (fsync, rename, fsync the directory); then call [`Exporter::written`].
    WriteFile {
        /// The plan.
        plan: Plan,
        /// Which data set.
        dataset: Dataset,
        /// Where, relative to the export directory.
        path: String,
    },
}

/// Where the exporter is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Nothing pending: [`Exporter::offer`] may plan.
    Idle,
    /// A plan is saved; waiting for its files.
    Writing { plan: Plan, done: Vec<FileEntry> },
}

/// The export state machine.
#[derive(Debug, Clone)]
pub struct Exporter {
    manifest: Manifest,
    step: Step,
    max_rows: u64,
}

/// The UTC day `YYYY-MM-DD` holding `ms`.
pub fn date_of_ms(ms: i64) -> String {
    let (y, m, d) = tally_clock::calendar::civil_from_ms(ms);
    format!("{y:04}-{m:02}-{d:02}")
}

impl Exporter {
    /// Starts from the manifest on disk (`None`: a new export). `max_rows` is clamped to
    /// 1..=[`MAX_ROWS_PER_FILE`]. Returns the actions of recovery: remove temporary files and,
    /// when a plan was pending, re-create its files.
    pub fn start(
        manifest: Option<Manifest>,
        format: Format,
        max_rows: u64,
    ) -> Result<(Self, Vec<Action>), CoreError> {
        let manifest = manifest.unwrap_or_else(|| Manifest::new(format));
        if manifest.format != format || manifest.schema_version != SCHEMA_VERSION {
            return Err(CoreError::Incompatible {
                found: manifest.format,
                version: manifest.schema_version,
                wanted: format,
            });
        }
        let mut ex = Exporter {
            manifest,
            step: Step::Idle,
            max_rows: max_rows.clamp(1, MAX_ROWS_PER_FILE),
        };
        let mut actions = vec![Action::RemoveTemps];
        if let Some(plan) = ex.manifest.pending.clone() {
            if plan.first != ex.manifest.last_position + 1 || plan.last < plan.first {
                return Err(CoreError::Gap {
                    after: ex.manifest.last_position,
                    got: plan.first,
                });
            }
            actions.extend(ex.write_actions(&plan));
            ex.step = Step::Writing {
                plan,
                done: Vec::new(),
            };
        }
        Ok((ex, actions))
    }

    /// The checkpoint: the last position exported.
    pub fn checkpoint(&self) -> u64 {
        self.manifest.last_position
    }

    /// The manifest as last saved or to be saved.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// True when a plan is being written.
    pub fn busy(&self) -> bool {
        matches!(self.step, Step::Writing { .. })
    }

    /// The shell read these `(position, posted_at_ms)` after the checkpoint, in order. Plans
    /// the first file: from the checkpoint on, while the posting day stays the same, at most
    /// `max_rows`. Returns nothing when busy or when `rows` is empty.
    pub fn offer(&mut self, rows: &[(u64, i64)]) -> Result<Vec<Action>, CoreError> {
        if self.busy() || rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut prev = self.manifest.last_position;
        let date = date_of_ms(rows[0].1);
        let mut last = prev;
        for &(pos, at) in rows {
            if pos != prev + 1 {
                return Err(CoreError::Gap {
                    after: prev,
                    got: pos,
                });
            }
            prev = pos;
            if last - self.manifest.last_position >= self.max_rows || date_of_ms(at) != date {
                break;
            }
            last = pos;
        }
        let plan = Plan {
            first: self.manifest.last_position + 1,
            last,
            date,
        };
        self.manifest.pending = Some(plan.clone());
        let mut actions = vec![Action::SaveManifest(self.manifest.clone())];
        actions.extend(self.write_actions(&plan));
        self.step = Step::Writing {
            plan,
            done: Vec::new(),
        };
        Ok(actions)
    }

    fn write_actions(&self, plan: &Plan) -> Vec<Action> {
        Dataset::ALL
            .iter()
            .map(|&dataset| Action::WriteFile {
                plan: plan.clone(),
                dataset,
                path: plan.path(dataset, self.manifest.format),
            })
            .collect()
    }

    /// A file of the pending plan is written and renamed. When every data set's is, moves the
    /// checkpoint: returns the manifest to save.
    pub fn written(&mut self, entry: FileEntry) -> Vec<Action> {
        let Step::Writing { plan, done } = &mut self.step else {
            panic!("written() without a pending plan");
        };
        assert_eq!(
            (entry.first_position, entry.last_position),
            (plan.first, plan.last),
            "a file of another plan"
        );
        assert!(
            !done.iter().any(|d| d.dataset == entry.dataset),
            "data set written twice"
        );
        done.push(entry);
        if done.len() < Dataset::ALL.len() {
            return Vec::new();
        }
        done.sort_by_key(|d| d.dataset);
        let last = plan.last;
        self.manifest.files.append(done);
        self.manifest.last_position = last;
        self.manifest.pending = None;
        self.step = Step::Idle;
        vec![Action::SaveManifest(self.manifest.clone())]
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
