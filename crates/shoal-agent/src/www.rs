//! `shoal www`: the built-in static file server, the embedded default app for
//! demos and benchmarks. HTTP/1.1 with keep-alive on hyper; file contents are
//! memory-mapped once and served as shared `Bytes`, so a hit costs a stat and
//! a reference count, not a read and a copy.
//!
//! With `--cache-mb N` it behaves like the thesis's memory-bound web server
//! VM (3.5.3): objects are held in an LRU cache of at most N MB, and a miss
//! is a real disk read that bypasses the page cache (O_DIRECT), so locality
//! shows up as disk reads and in response time. Hits, misses and bytes read
//! from disk are served as Prometheus text at `/_shoal/metrics`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// `shoal www` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example:\n  shoal www --listen 127.0.0.1:8081 --root /srv/www")]
pub struct WwwArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Directory to serve.
    #[arg(long)]
    pub root: PathBuf,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Hold at most this many MB of objects in memory (LRU) and read
    /// misses from disk bypassing the page cache (O_DIRECT), as a server
    /// with that much memory would. Default: map every file (page cache).
    #[arg(long, value_name = "MB", value_parser = parse_cache_mb)]
    pub cache_mb: Option<f64>,
    /// Cap this server at this many CPUs (a CPU cgroup of its own, v2 or
    /// v1, removed when it stops; needs root): a node of known capacity for
    /// the CPU-heavy route `/_shoal/burn?ms=N`.
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus)]
    pub cpus: Option<f64>,
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.01..=1024.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?}: give a number of CPUs from 0.01 to 1024, e.g. --cpus 0.25"
        )),
    }
}

fn parse_cache_mb(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1e6).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?}: give the cache size in MB (10^6 bytes) as a number from 0 to 1000000, e.g. --cache-mb 48"
        )),
    }
}

/// A byte-bounded LRU object cache; misses are read with O_DIRECT.
struct ObjectCache {
    limit: u64,
    used: u64,
    lru: lru::LruCache<PathBuf, Cached>,
}

/// What `/_shoal/metrics` reports.
#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    disk_reads: AtomicU64,
    disk_read_bytes: AtomicU64,
}

/// Reads a whole file bypassing the page cache: O_DIRECT into a
/// 4096-aligned buffer. A file system without O_DIRECT (tmpfs) is read
/// normally and its pages dropped after (POSIX_FADV_DONTNEED).
fn read_direct(path: &Path, len: u64) -> std::io::Result<Bytes> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const ALIGN: usize = 4096;
    let len = len as usize;
    let rounded = len.div_ceil(ALIGN).max(1) * ALIGN;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
    {
        Ok(mut f) => {
            let mut v = vec![0u8; rounded + ALIGN];
            let off = v.as_ptr().align_offset(ALIGN);
            let mut got = 0;
            while got < len {
                let n = f.read(&mut v[off + got..off + rounded])?;
                if n == 0 {
                    break;
                }
                got += n;
                // O_DIRECT reads whole blocks; a short read is the end.
                if got % ALIGN != 0 {
                    break;
                }
            }
            let got = got.min(len);
            Ok(Bytes::from(v).slice(off..off + got))
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
            let mut f = std::fs::File::open(path)?;
            let mut v = Vec::with_capacity(len);
            f.read_to_end(&mut v)?;
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            Ok(Bytes::from(v))
        }
        Err(e) => Err(e),
    }
}

#[derive(Clone)]
struct Cached {
    mtime: SystemTime,
    len: u64,
    body: Bytes,
    ctype: HeaderValue,
}

struct Files {
    root: PathBuf,
    cache: RwLock<HashMap<PathBuf, Cached>>,
    /// `--cache-mb`: bounded memory, misses from disk.
    objects: Option<Mutex<ObjectCache>>,
    stats: Stats,
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" => "application/javascript",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// Maps a request path to a file under `root`, refusing anything that
/// would leave it. The query string is not part of `path`.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(path)?;
    let mut out = root.to_path_buf();
    for c in Path::new(&decoded).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    (!s.contains('\0')).then_some(s)
}

impl Files {
    fn load(&self, path: &Path) -> std::io::Result<Option<Cached>> {
        let mut path = path.to_path_buf();
        let mut md = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if md.is_dir() {
            path.push("index.html");
            md = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                _ => return Ok(None),
            };
        }
        let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(objects) = &self.objects {
            return self.load_bounded(objects, path, mtime, md.len()).map(Some);
        }
        if let Some(c) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&path)
            && c.mtime == mtime
            && c.len == md.len()
        {
            return Ok(Some(c.clone()));
        }
        let f = std::fs::File::open(&path)?;
        let body = if md.len() == 0 {
            Bytes::new()
        } else {
            // SAFETY: the map is read-only; a file truncated underneath
            // would fault, which is the documented hazard of serving a file
            // that is being rewritten in place. Deploys replace files (new
            // inode), which leaves the old mapping intact.
            let map = unsafe { memmap2::Mmap::map(&f)? };
            Bytes::from_owner(map)
        };
        let c = Cached {
            mtime,
            len: md.len(),
            body,
            ctype: HeaderValue::from_static(content_type(&path)),
        };
        let mut w = self.cache.write().unwrap_or_else(|p| p.into_inner());
        // Bounded: a crawler of many files must not pin them all forever.
        if w.len() > 100_000 {
            w.clear();
        }
        w.insert(path, c.clone());
        Ok(Some(c))
    }

    fn load_bounded(
        &self,
        objects: &Mutex<ObjectCache>,
        path: PathBuf,
        mtime: SystemTime,
        len: u64,
    ) -> std::io::Result<Cached> {
        {
            let mut c = objects.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(hit) = c.lru.get(&path)
                && hit.mtime == mtime
                && hit.len == len
            {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(hit.clone());
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let body = read_direct(&path, len)?;
        self.stats.disk_reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .disk_read_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let c = Cached {
            mtime,
            len,
            body,
            ctype: HeaderValue::from_static(content_type(&path)),
        };
        let mut oc = objects.lock().unwrap_or_else(|p| p.into_inner());
        if len <= oc.limit {
            if let Some(old) = oc.lru.pop(&path) {
                oc.used -= old.len;
            }
            while oc.used + len > oc.limit {
                match oc.lru.pop_lru() {
                    Some((_, old)) => oc.used -= old.len,
                    None => break,
                }
            }
            oc.used += len;
            oc.lru.put(path, c.clone());
        }
        Ok(c)
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let (used, limit) = match &self.objects {
            Some(o) => {
                let o = o.lock().unwrap_or_else(|p| p.into_inner());
                (o.used, o.limit)
            }
            None => (0, 0),
        };
        let s = &self.stats;
        let body = format!(
            "# TYPE shoal_www_cache_hits_total counter\nshoal_www_cache_hits_total {}\n\
             # TYPE shoal_www_cache_misses_total counter\nshoal_www_cache_misses_total {}\n\
             # TYPE shoal_www_disk_reads_total counter\nshoal_www_disk_reads_total {}\n\
             # TYPE shoal_www_disk_read_bytes_total counter\nshoal_www_disk_read_bytes_total {}\n\
             # TYPE shoal_www_cache_bytes gauge\nshoal_www_cache_bytes {used}\n\
             # TYPE shoal_www_cache_limit_bytes gauge\nshoal_www_cache_limit_bytes {limit}\n",
            s.hits.load(Ordering::Relaxed),
            s.misses.load(Ordering::Relaxed),
            s.disk_reads.load(Ordering::Relaxed),
            s.disk_read_bytes.load(Ordering::Relaxed),
        );
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.uri().path() == METRICS_PATH {
            return self.metrics();
        }
        if req.uri().path() == INVENTORY_PATH {
            return self.inventory();
        }
        let head = req.method() == Method::HEAD;
        if req.method() != Method::GET && !head {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        }
        let Some(p) = resolve(&self.root, req.uri().path()) else {
            return text(StatusCode::BAD_REQUEST, "bad path\n");
        };
        match self.load(&p) {
            Ok(Some(c)) => {
                let mut r =
                    Response::new(Full::new(if head { Bytes::new() } else { c.body.clone() }));
                r.headers_mut().insert(CONTENT_TYPE, c.ctype);
                if head {
                    r.headers_mut()
                        .insert(CONTENT_LENGTH, HeaderValue::from(c.len));
                }
                r
            }
            Ok(None) => text(StatusCode::NOT_FOUND, "not found\n"),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                text(StatusCode::FORBIDDEN, "forbidden\n")
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read file\n"),
        }
    }
}

impl Files {
    /// `/_shoal/inventory`: `SIZE PATH` per regular file under the root,
    /// paths as a client asks for them; at most [`INVENTORY_MAX`] lines.
    /// What a federated cluster tells its peers it holds.
    fn inventory(&self) -> Response<Full<Bytes>> {
        let mut out = String::new();
        let mut n = 0usize;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(t) = e.file_type() else { continue };
                let path = e.path();
                if t.is_dir() {
                    stack.push(path);
                } else if t.is_file()
                    && let (Ok(m), Ok(rel)) = (e.metadata(), path.strip_prefix(&self.root))
                    && let Some(rel) = rel.to_str()
                {
                    out.push_str(&format!("{} /{rel}\n", m.len()));
                    n += 1;
                    if n >= INVENTORY_MAX {
                        return inventory_response(out);
                    }
                }
            }
        }
        inventory_response(out)
    }
}

fn inventory_response(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Most files `/_shoal/inventory` lists.
pub const INVENTORY_MAX: usize = 200_000;
/// Where `shoal www` lists the files it serves.
pub const INVENTORY_PATH: &str = "/_shoal/inventory";
/// The CPU-heavy route: `GET /_shoal/burn?ms=N` spends N ms of CPU (this
/// thread's CPU time, so a contended or capped CPU takes longer) and
/// answers. N from 1 to 60000.
pub const BURN_PATH: &str = "/_shoal/burn";

/// Spends `ms` of this thread's CPU time.
fn burn(ms: u64) {
    use nix::time::{ClockId, clock_gettime};
    let cpu = || {
        clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
            .unwrap_or_default()
    };
    let until = cpu() + Duration::from_millis(ms);
    let mut x = 0u64;
    while cpu() < until {
        for i in 0..10_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        std::hint::black_box(x);
    }
}

fn burn_response(query: Option<&str>) -> Response<Full<Bytes>> {
    let ms = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse::<u64>().ok());
    match ms {
        Some(ms) if (1..=60_000).contains(&ms) => {
            burn(ms);
            let mut r = Response::new(Full::new(Bytes::from(format!("burned {ms} ms of CPU\n"))));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        _ => text(
            StatusCode::BAD_REQUEST,
            "give the CPU time to burn in ms, 1 to 60000: /_shoal/burn?ms=200\n",
        ),
    }
}

fn text(code: StatusCode, s: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(s.as_bytes())));
    *r.status_mut() = code;
    r
}

/// Where `shoal www` serves its own counters.
pub const METRICS_PATH: &str = "/_shoal/metrics";

/// Serves `root` on an already bound listener until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, root: PathBuf) {
    serve_with(listener, root, None).await
}

/// [`serve`], with `--cache-mb`'s bounded cache when `cache_mb` is given.
pub async fn serve_with(listener: tokio::net::TcpListener, root: PathBuf, cache_mb: Option<f64>) {
    let files = Arc::new(Files {
        root,
        cache: RwLock::new(HashMap::new()),
        objects: cache_mb.map(|mb| {
            Mutex::new(ObjectCache {
                limit: (mb * 1e6) as u64,
                used: 0,
                lru: lru::LruCache::unbounded(),
            })
        }),
        stats: Stats::default(),
    });
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let files = files.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let files = files.clone();
                async move {
                    // The CPU-heavy route and a bounded cache's miss (a
                    // disk read) run off the async workers.
                    let r = if req.uri().path() == BURN_PATH {
                        let q = req.uri().query().map(str::to_string);
                        tokio::task::spawn_blocking(move || burn_response(q.as_deref()))
                            .await
                            .unwrap_or_else(|_| {
                                text(StatusCode::INTERNAL_SERVER_ERROR, "burn failed\n")
                            })
                    } else if files.objects.is_some() {
                        let (parts, _) = req.into_parts();
                        let req = Request::from_parts(parts, ());
                        tokio::task::spawn_blocking(move || files.respond(&req))
                            .await
                            .unwrap_or_else(|_| {
                                text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read file\n")
                            })
                    } else {
                        files.respond(&req)
                    };
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

/// Runs `shoal www` until interrupted.
pub fn run(args: WwwArgs) -> anyhow::Result<()> {
    if !args.root.is_dir() {
        anyhow::bail!(
            "--root {}: not a directory; create it or point --root at the files to serve",
            args.root.display()
        );
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t.max(1));
    }
    // Held until the server stops; dropping it moves this process back to
    // the root cgroup and removes the group.
    let _cpu_cap = match args.cpus {
        Some(c) => {
            let v = crate::platform::cgroup::detect().map_err(|e| {
                anyhow::anyhow!("--cpus {c}: {e}; drop --cpus to run without a CPU cap")
            })?;
            let g = crate::platform::cgroup::CpuGroup::create(
                v,
                &format!("shoal-www-{}", std::process::id()),
            )
            .and_then(|g| {
                g.set_limit(Some(c))?;
                g.add(std::process::id())?;
                Ok(g)
            })
            .map_err(|e| anyhow::anyhow!("--cpus {c}: {e}; run as root, or drop --cpus"))?;
            Some(g)
        }
        None => None,
    };
    rt.enable_all().build()?.block_on(async move {
        let l = shoal_net::server::bind(&args.listen).await?;
        eprintln!(
            "shoal www serving {} on http://{}",
            args.root.display(),
            l.local_addr()?
        );
        tokio::select! {
            _ = serve_with(l, args.root, args.cache_mb) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => { s.recv().await; }
                    Err(_) => std::future::pending::<()>().await,
                }
            } => {}
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_the_root() {
        let r = Path::new("/srv");
        assert_eq!(
            resolve(r, "/a/b.html"),
            Some(PathBuf::from("/srv/a/b.html"))
        );
        assert_eq!(resolve(r, "/a/../../etc/passwd"), None);
        assert_eq!(resolve(r, "/%2e%2e/etc/passwd"), None);
        assert_eq!(resolve(r, "/a%20b"), Some(PathBuf::from("/srv/a b")));
        assert_eq!(resolve(r, "/bad%zz"), None);
        assert_eq!(resolve(r, "/nul%00"), None);
    }
}
