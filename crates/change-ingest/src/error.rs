//! The one error type of this crate.

use std::fmt;

/// Everything that can go wrong on the Postgres side.
///
/// Database errors keep the server's message (`ERROR: ... DETAIL: ...`) in their
/// `Display`, so a log line or a CLI error is enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The connection string could not be parsed.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// Connecting to Postgres failed.
    #[error("could not connect to PostgreSQL: {}", PgDisplay(.0))]
    Connect(#[source] tokio_postgres::Error),
    /// The TLS settings of the connection string cannot be used (`sslrootcert`).
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    /// A query failed.
    #[error("database error: {}", PgDisplay(.0))]
    Db(#[from] tokio_postgres::Error),
    /// A migration failed; the schema is left at the previous version.
    #[error("migration {version} failed: {}", PgDisplay(.source))]
    Migration {
        /// The version that failed.
        version: i32,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The listener connection closed.
    #[error("the listener connection to PostgreSQL closed")]
    ListenerClosed,
    /// The database returned something this crate does not understand.
    #[error("unexpected data from PostgreSQL: {0}")]
    Protocol(String),
    /// The named table does not exist (`relation "public.nope" does not exist`).
    #[error("relation \"{0}\" does not exist")]
    UnknownTable(String),
    /// The table name could not be parsed (`schema.table`, quoted identifiers allowed).
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTableName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The relation exists but cannot be enabled (a view, a system table, ...).
    #[error("\"{table}\" cannot be enabled for realtime: {reason}")]
    NotEligible {
        /// `schema.table`.
        table: String,
        /// Why.
        reason: String,
    },
    /// No PostgreSQL server binaries were found for the embedded server.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: {0}. Install them, e.g. \
         `apt-get install postgresql` (Debian/Ubuntu), `dnf install postgresql-server` (Fedora) \
         or `brew install postgresql` (macOS), or set DATABASE_URL to an existing database"
    )]
    PostgresNotInstalled(String),
    /// Starting, restarting or stopping the embedded server failed.
    #[error("embedded PostgreSQL: {0}")]
    Embedded(String),
    /// An I/O error (embedded server files, spawning processes).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl IngestError {
    /// The SQLSTATE code of a database error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            IngestError::Connect(e) | IngestError::Db(e) => e.code().map(|c| c.code()),
            IngestError::Migration { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// Formats a `tokio_postgres::Error` with the server's message: its own `Display`
/// says only "db error".
pub(crate) struct PgDisplay<'a>(pub(crate) &'a tokio_postgres::Error);

impl fmt::Display for PgDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            write!(f, "{}: {}", db.severity(), db.message())?;
            if let Some(detail) = db.detail() {
                write!(f, " DETAIL: {detail}")?;
            }
            if let Some(hint) = db.hint() {
                write!(f, " HINT: {hint}")?;
            }
            return Ok(());
        }
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
