//! The store knows it exists: `init` creates `registry.db` and records its
//! identity (a random id kept both in the database and in the cluster
//! directory's `store.id`), and the manager refuses to start on a database
//! that is missing, empty or another cluster's, instead of starting empty
//! and reporting "0 registrations restored".

use shoal_net::identity::ClusterDir;
use shoal_store::{SqliteStore, Store};
use std::path::Path;

/// The cluster directory's record of its store.
pub const STORE_ID_FILE: &str = "store.id";
const META: &str = "meta";
const STORE_ID: &str = "store_id";

fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn restore_hint(db: &Path) -> String {
    format!(
        "restore {0} (with {0}-wal if it was kept) from a backup, or start the manager with --reset-store to accept an empty registry (every service, assignment and node binding is lost; nodes must join again)",
        db.display()
    )
}

/// Creates a fresh store and records its identity (`init`, `--reset-store`).
pub fn create(dir: &ClusterDir) -> anyhow::Result<SqliteStore> {
    let db = dir.db_path();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
    let store = SqliteStore::open(&db).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    let id = new_id();
    store.put_doc(META, STORE_ID, &id)?;
    shoal_net::identity::write_file(&dir.path.join(STORE_ID_FILE), &format!("{id}\n"), true)?;
    Ok(store)
}

/// Opens the store the cluster directory recorded, refusing a missing,
/// empty or foreign one. A directory from before store identities adopts
/// the database it finds.
pub fn open(dir: &ClusterDir, reset: bool) -> anyhow::Result<SqliteStore> {
    let db = dir.db_path();
    if reset {
        eprintln!(
            "--reset-store: starting with an empty registry at {}",
            db.display()
        );
        return create(dir);
    }
    let id_file = dir.path.join(STORE_ID_FILE);
    let recorded = std::fs::read_to_string(&id_file)
        .ok()
        .map(|s| s.trim().to_string());
    let size = std::fs::metadata(&db).map(|m| m.len()).ok();
    let Some(recorded) = recorded else {
        // Before store identities: adopt what is there (or create).
        let store = SqliteStore::open(&db).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
        let id = match store.get_doc(META, STORE_ID)? {
            Some(id) => id,
            None => {
                let id = new_id();
                store.put_doc(META, STORE_ID, &id)?;
                id
            }
        };
        shoal_net::identity::write_file(&id_file, &format!("{id}\n"), true)?;
        return Ok(store);
    };
    match size {
        None => anyhow::bail!(
            "{} is missing, but {} records that this cluster's registry lives there; {}",
            db.display(),
            id_file.display(),
            restore_hint(&db)
        ),
        Some(0) => anyhow::bail!(
            "{} is empty (0 bytes): the registry of this cluster was lost; {}",
            db.display(),
            restore_hint(&db)
        ),
        Some(_) => {}
    }
    let store = SqliteStore::open(&db).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    match store.get_doc(META, STORE_ID)? {
        Some(id) if id == recorded => Ok(store),
        Some(id) => anyhow::bail!(
            "{} belongs to another store (id {id}, this cluster's is {recorded}): it was copied from another cluster or a re-init; {}",
            db.display(),
            restore_hint(&db)
        ),
        None => anyhow::bail!(
            "{} holds no store identity (this cluster's is {recorded}): it is not the registry `shoal init` created; {}",
            db.display(),
            restore_hint(&db)
        ),
    }
}
