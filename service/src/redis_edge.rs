//! The Redis edge: one Lua script (service/src/gcra.lua) per group of keys, EVALSHA with a
//! fallback to EVAL on NOSCRIPT (which loads the script into that node's cache again, e.g.
//! after a restart or a failover to a replica that never saw it).
//!
//! Single node: every key of a request goes to one script call, so a request's descriptors
//! are decided atomically. Redis Cluster: a script may only touch keys of one hash slot, so
//! keys are grouped by hash tag (a tenant's buckets share one); the groups are debited one
//! after another, and when a later group is denied the earlier ones are refunded with the
//! part of the debit that cannot have refilled yet (never over-admits; see units::refundable).
//!
//! With `--redis-wait-replicas`, each script call is pipelined with `WAIT` (see `Wait`).

use crate::plan::{Debit, Result1};

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;

pub const SCRIPT: &str = include_str!("gcra.lua");

#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Why a call failed (a gRPC error for the proxy; counted).
#[derive(Debug)]
pub enum EdgeError {
    Redis(RedisError),
    Timeout,
    /// The script answered something we cannot read (never expected).
    Reply(String),
    /// `WAIT`: fewer replicas than required acknowledged the write in time (the debit stands
    /// on the master, but a failover now could lose it).
    Replicas {
        acked: i64,
        wanted: u32,
    },
}

impl std::fmt::Display for EdgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EdgeError::Redis(e) => write!(f, "redis: {e}"),
            EdgeError::Timeout => write!(f, "redis: no answer before the deadline"),
            EdgeError::Reply(s) => write!(f, "redis: unexpected script reply: {s}"),
            EdgeError::Replicas { acked, wanted } => {
                write!(f, "redis: {acked} of {wanted} replicas acknowledged the write in time (WAIT)")
            }
        }
    }
}

/// `--redis-wait-replicas N --redis-wait-ms M`: after each script call, `WAIT N M` in the
/// same pipeline (one round trip), so an answer is sent only once N replicas hold the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub replicas: u32,
    pub ms: u64,
}

pub struct Edge {
    conn: Conn,
    /// More connections, used in turn with `conn` (only with `WAIT`, see main.rs).
    more: Vec<Conn>,
    next: std::sync::atomic::AtomicUsize,
    sha: String,
    wait: Option<Wait>,
    /// Redis commands sent (EVALSHA, and EVAL after NOSCRIPT), for the metrics.
    pub commands: std::sync::atomic::AtomicU64,
}

pub async fn connect_single(url: &str, timeout: Duration) -> Result<Conn, RedisError> {
    let client = redis::Client::open(url)?;
    // Reconnects in the background with exponential backoff when the connection drops.
    let manager = ConnectionManager::new_with_backoff_and_timeouts(client, 2, 50, 6, timeout, timeout).await?;
    Ok(Conn::Single(manager))
}

pub async fn connect_cluster(urls: &[String], timeout: Duration) -> Result<Conn, RedisError> {
    let client = redis::cluster::ClusterClient::builder(urls.to_vec())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(3)
        .build()?;
    Ok(Conn::Cluster(client.get_async_connection().await?))
}

/// `EVALSHA sha` or `EVAL script` over `debits` (see gcra.lua for the arguments). Numbers go
/// in as integers (redis-rs writes them into the command buffer; no string per argument).
fn script_cmd(head: &str, script: &str, debits: &[&Debit], refund_of: Option<u64>) -> redis::Cmd {
    let mut cmd = redis::cmd(head);
    cmd.arg(script).arg(debits.len());
    for d in debits {
        cmd.arg(d.key.as_str());
    }
    cmd.arg(if refund_of.is_some() { "r" } else { "d" }).arg(refund_of.unwrap_or(0));
    for d in debits {
        cmd.arg(d.limit.interval).arg(d.limit.capacity).arg(d.cost);
    }
    cmd
}

fn int(v: Option<&Value>) -> Result<i64, EdgeError> {
    match v {
        Some(Value::Int(i)) => Ok(*i),
        other => Err(EdgeError::Reply(format!("{other:?}"))),
    }
}

impl Edge {
    pub fn new(conn: Conn, more: Vec<Conn>, wait: Option<Wait>) -> Edge {
        Edge {
            conn,
            more,
            next: Default::default(),
            sha: redis::Script::new(SCRIPT).get_hash().to_string(),
            wait,
            commands: Default::default(),
        }
    }

    /// A connection (cheap to clone: a handle to a multiplexed connection; with `WAIT`, the
    /// next of several in turn). Both kinds
    /// recover by themselves: a single node's ConnectionManager reconnects, and the cluster
    /// connection follows a failover to the promoted replica (tests/service/test_cluster.py).
    pub fn conn(&self) -> Conn {
        if self.more.is_empty() {
            return self.conn.clone();
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % (self.more.len() + 1);
        self.more.get(i).unwrap_or(&self.conn).clone()
    }

    async fn run(&self, debits: &[&Debit], refund_of: Option<u64>) -> Result<Value, EdgeError> {
        self.commands.fetch_add(1, Ordering::Relaxed);
        let conn = self.conn();
        let first = self.query(&conn, script_cmd("EVALSHA", &self.sha, debits, refund_of)).await;
        match first {
            Err(EdgeError::Redis(e)) if e.kind() == ErrorKind::NoScriptError => {
                self.commands.fetch_add(1, Ordering::Relaxed);
                self.query(&conn, script_cmd("EVAL", SCRIPT, debits, refund_of)).await
            }
            other => other,
        }
    }

    /// The script call, alone or followed by `WAIT` in one pipeline. A pipeline goes to one
    /// node (on a cluster, the one that owns the script's keys), so `WAIT` counts the replicas
    /// of the master that took the write.
    async fn query(&self, conn: &Conn, cmd: redis::Cmd) -> Result<Value, EdgeError> {
        let Some(w) = self.wait else {
            return match conn {
                Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
                Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
            }
            .map_err(EdgeError::Redis);
        };
        let mut pipe = redis::pipe();
        pipe.add_command(cmd).cmd("WAIT").arg(w.replicas).arg(w.ms);
        let replies: Vec<Value> = match conn {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
        .map_err(EdgeError::Redis)?;
        let mut replies = replies.into_iter();
        let (Some(reply), acked) = (replies.next(), int(replies.next().as_ref())?) else {
            return Err(EdgeError::Reply("no reply to the script in the WAIT pipeline".into()));
        };
        if acked < i64::from(w.replicas) {
            return Err(EdgeError::Replicas { acked, wanted: w.replicas });
        }
        Ok(reply)
    }

    /// One script call over `debits` (all keys in one slot, or any keys on a single node).
    /// Returns the Redis time of the call (us) and one result per debit.
    async fn script(&self, debits: &[&Debit], refund_of: Option<u64>) -> Result<(u64, Vec<Result1>), EdgeError> {
        let reply = self.run(debits, refund_of).await?;
        let Value::Bulk(items) = reply else {
            return Err(EdgeError::Reply(format!("{reply:?}")));
        };
        let now = u64::try_from(int(items.first())?).unwrap_or(0);
        let mut out = Vec::with_capacity(debits.len());
        for i in 0..debits.len() {
            let at = 1 + 4 * i;
            let retry = int(items.get(at + 3))?;
            out.push(Result1 {
                allowed: int(items.get(at))? == 1,
                remaining: u64::try_from(int(items.get(at + 1))?).unwrap_or(0),
                reset: u64::try_from(int(items.get(at + 2))?).unwrap_or(0),
                retry: u64::try_from(retry).ok(),
            });
        }
        Ok((now, out))
    }

    /// Decides all debits of a request: every bucket is debited, or none (see the module
    /// doc for how, per deployment).
    pub async fn decide(&self, debits: &[Debit]) -> Result<Vec<Result1>, EdgeError> {
        if debits.is_empty() {
            return Ok(Vec::new());
        }
        if let Conn::Single(_) = self.conn {
            let all: Vec<&Debit> = debits.iter().collect();
            return Ok(self.script(&all, None).await?.1);
        }
        // Cluster: group by hash tag, in first-seen order.
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, d) in debits.iter().enumerate() {
            match groups.iter_mut().find(|(t, _)| *t == d.tag) {
                Some((_, v)) => v.push(i),
                None => groups.push((d.tag.as_str(), vec![i])),
            }
        }
        let mut results: Vec<Option<Result1>> = vec![None; debits.len()];
        let mut done: Vec<(u64, Vec<&Debit>)> = Vec::new();
        let mut denied = false;
        for (_, idx) in &groups {
            let group: Vec<&Debit> = idx.iter().filter_map(|&i| debits.get(i)).collect();
            let outcome = self.script(&group, None).await;
            let (now, rs) = match outcome {
                Ok(x) => x,
                Err(e) => {
                    // Give back what earlier groups took, then report the error.
                    self.refund(&done).await;
                    return Err(e);
                }
            };
            let ok = rs.iter().all(|r| r.allowed);
            for (&i, r) in idx.iter().zip(rs) {
                if let Some(slot) = results.get_mut(i) {
                    *slot = Some(r);
                }
            }
            if ok {
                done.push((now, group));
            } else {
                denied = true;
                break;
            }
        }
        if denied {
            self.refund(&done).await;
        }
        // Groups not reached after a denial were not debited: reported as admitted, with no
        // change (they would not have been debited either way).
        Ok(results
            .into_iter()
            .zip(debits)
            .map(|(r, d)| r.unwrap_or(Result1 { allowed: true, remaining: d.limit.capacity, reset: 0, retry: Some(0) }))
            .collect())
    }

    async fn refund(&self, done: &[(u64, Vec<&Debit>)]) {
        for (at, group) in done {
            // Best effort: a failed refund under-admits (tokens stay spent), never over-admits.
            let _ = self.script(group, Some(*at)).await;
        }
    }
}
