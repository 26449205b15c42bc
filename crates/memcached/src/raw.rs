//! The bare client under the adapter, for benchmarks that measure what the
//! adapter adds: one server, no key checks, no hashing, no error mapping.

use bytes::Bytes;

use crate::client::Server;
use crate::conn::Deadline;
use crate::proto::{self, Kind};

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// One server, spoken to directly.
pub struct RawClient {
    server: Server,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient")
            .field("server", &self.server.name)
            .finish()
    }
}

impl RawClient {
    /// A client of `addr` (`host:port`) with `connections` pipelined connections.
    pub fn new(addr: &str, connections: usize) -> Self {
        RawClient {
            server: Server::new(addr.to_owned(), connections, TIMEOUT, TIMEOUT),
        }
    }

    /// `mg <key> v`.
    pub async fn get(
        &self,
        key: &str,
    ) -> Result<Option<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
        let mut buf = Vec::with_capacity(key.len() + 8);
        proto::get(&mut buf, key, false);
        let mut r = self
            .server
            .call(buf, Kind::Meta, 1, Deadline::after(TIMEOUT))
            .await?;
        Ok(crate::value_of(r.pop().ok_or("no answer")?)?)
    }

    /// `ms <key> <len>`.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut buf = Vec::new();
        proto::set(&mut buf, key, value, 0, proto::SetMode::Set);
        let r = self
            .server
            .call(buf, Kind::Meta, 1, Deadline::after(TIMEOUT))
            .await?;
        crate::stored(r.first().ok_or("no answer")?)?;
        Ok(())
    }

    /// `ms <key> <len> [T<exptime>]` for every item, pipelined: one write,
    /// one wait for all the answers. `exptime` is in seconds, `0` for none.
    pub async fn set_many<K: AsRef<str>, V: AsRef<[u8]>>(
        &self,
        items: &[(K, V)],
        exptime: u64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if items.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(
            items
                .iter()
                .map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 48)
                .sum(),
        );
        for (k, v) in items {
            proto::set(
                &mut buf,
                k.as_ref(),
                v.as_ref(),
                exptime,
                proto::SetMode::Set,
            );
        }
        let r = self
            .server
            .call(buf, Kind::Meta, items.len(), Deadline::after(TIMEOUT))
            .await?;
        if r.len() != items.len() {
            return Err("missing answers".into());
        }
        for resp in &r {
            crate::stored(resp)?;
        }
        Ok(())
    }

    /// `md <key>`: whether an item was there.
    pub async fn delete(
        &self,
        key: &str,
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
        let mut buf = Vec::with_capacity(key.len() + 5);
        proto::delete(&mut buf, key);
        let r = self
            .server
            .call(buf, Kind::Meta, 1, Deadline::after(TIMEOUT))
            .await?;
        match r.first() {
            Some(proto::Resp::Meta {
                code: proto::Code::Done,
                ..
            }) => Ok(true),
            Some(proto::Resp::Meta {
                code: proto::Code::NotFound,
                ..
            }) => Ok(false),
            Some(other) => Err(crate::unexpected(other).into()),
            None => Err("no answer".into()),
        }
    }
}
