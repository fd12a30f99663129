//! shoal-store: what the manager acknowledges is durable here. Leases and
//! load samples are soft state and never touch the store.

use rusqlite::{Connection, OptionalExtension, params};
use shoal_net::wire::{AppAssignment, Registration};
use std::path::Path;
use std::sync::Mutex;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file could not be created or made private.
    #[error("registry database: {0}")]
    Io(String),
    /// A stored row could not be decoded.
    #[error("registry database holds a corrupt row for {key}: {detail}")]
    Corrupt {
        /// Which row.
        key: String,
        /// Why.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

pub use shoal_net::wire::NodeRecord;

/// Durable state of the manager.
pub trait Store: Send + Sync {
    /// Every node record.
    fn nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Creates or replaces a node's registration, keeping its desired apps.
    fn put_registration(&self, reg: &Registration) -> Result<()>;
    /// Replaces a node's desired applications; returns the new generation.
    fn put_desired(&self, node: &str, desired: &[AppAssignment]) -> Result<Option<u64>>;
    /// Removes a node entirely.
    fn delete_node(&self, node: &str) -> Result<bool>;
    /// A key/value document (services and other manager state).
    fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>>;
    /// Stores a document.
    fn put_doc(&self, kind: &str, key: &str, value: &str) -> Result<()>;
    /// Deletes a document.
    fn delete_doc(&self, kind: &str, key: &str) -> Result<bool>;
    /// All documents of a kind, by key.
    fn docs(&self, kind: &str) -> Result<Vec<(String, String)>>;
}

/// The embedded default: SQLite in WAL mode with full sync, so an
/// acknowledged write survives a crash of the manager or of the machine.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`. The database and
    /// its WAL hold the apps' secret parameters: they are made mode 0600
    /// (SQLite gives the WAL and shared-memory files the database's mode).
    pub fn open(path: &Path) -> Result<Self> {
        private_file(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS nodes (
                name TEXT PRIMARY KEY,
                registration TEXT NOT NULL,
                desired TEXT NOT NULL DEFAULT '[]',
                generation INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS docs (
                kind TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (kind, key)
            );",
        )?;
        for suffix in ["-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if p.exists() {
                private_file(&p)?;
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (every write is one statement), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates `path` with mode 0600 if missing, and makes it 0600 if not.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("wire types always serialize")
}

impl Store for SqliteStore {
    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let c = self.conn();
        let mut st =
            c.prepare("SELECT name, registration, desired, generation FROM nodes ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, reg, desired, generation) = row?;
            out.push(NodeRecord {
                registration: decode(&name, &reg)?,
                desired: decode(&name, &desired)?,
                generation: generation as u64,
            });
        }
        Ok(out)
    }

    fn put_registration(&self, reg: &Registration) -> Result<()> {
        self.conn().execute(
            "INSERT INTO nodes (name, registration) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET registration = excluded.registration",
            params![reg.name, encode(reg)],
        )?;
        Ok(())
    }

    fn put_desired(&self, node: &str, desired: &[AppAssignment]) -> Result<Option<u64>> {
        let c = self.conn();
        let n = c.execute(
            "UPDATE nodes SET desired = ?2, generation = generation + 1 WHERE name = ?1",
            params![node, encode(&desired)],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let g: i64 = c.query_row(
            "SELECT generation FROM nodes WHERE name = ?1",
            params![node],
            |r| r.get(0),
        )?;
        Ok(Some(g as u64))
    }

    fn delete_node(&self, node: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM nodes WHERE name = ?1", params![node])?
            > 0)
    }

    fn get_doc(&self, kind: &str, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM docs WHERE kind = ?1 AND key = ?2",
                params![kind, key],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn put_doc(&self, kind: &str, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO docs (kind, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT(kind, key) DO UPDATE SET value = excluded.value",
            params![kind, key, value],
        )?;
        Ok(())
    }

    fn delete_doc(&self, kind: &str, key: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM docs WHERE kind = ?1 AND key = ?2",
            params![kind, key],
        )? > 0)
    }

    fn docs(&self, kind: &str) -> Result<Vec<(String, String)>> {
        let c = self.conn();
        let mut st = c.prepare("SELECT key, value FROM docs WHERE kind = ?1 ORDER BY key")?;
        let rows = st.query_map(params![kind], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_and_desired_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        {
            let s = SqliteStore::open(&p).unwrap();
            let reg = Registration {
                name: "n1".into(),
                address: "127.0.0.1".into(),
                roles: vec!["web".into()],
                capacities: [("net_mbps".to_string(), 100.0)].into(),
            };
            s.put_registration(&reg).unwrap();
            let app = AppAssignment {
                id: "www".into(),
                adaptor: "www".into(),
                params: [("listen".to_string(), "127.0.0.1:0".to_string())].into(),
            };
            assert_eq!(s.put_desired("n1", &[app]).unwrap(), Some(1));
            assert_eq!(s.put_desired("ghost", &[]).unwrap(), None);
            s.put_doc("service", "web", "{}").unwrap();
        }
        let s = SqliteStore::open(&p).unwrap();
        let nodes = s.nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].registration.roles, vec!["web".to_string()]);
        assert_eq!(nodes[0].desired[0].id, "www");
        assert_eq!(nodes[0].generation, 1);
        // Re-registering keeps the desired apps.
        s.put_registration(&nodes[0].registration).unwrap();
        assert_eq!(s.nodes().unwrap()[0].desired.len(), 1);
        assert_eq!(s.docs("service").unwrap().len(), 1);
        assert!(s.delete_node("n1").unwrap());
        assert!(s.nodes().unwrap().is_empty());
    }
}
