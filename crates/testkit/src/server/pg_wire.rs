//! Just enough of the PostgreSQL frontend/backend protocol (version 3) to
//! check readiness and run simple queries, with trust authentication only.
//! A TCP connect is not a readiness check for PostgreSQL: it accepts
//! connections while it starts up or recovers, and then refuses sessions.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// The protocol version 3.0 code in a startup message.
const PROTOCOL_3_0: i32 = 196_608;
/// Bigger messages are taken as garbage rather than allocated.
const MAX_MESSAGE: usize = 64 << 20;

/// Rows of a simple query, every value in text form.
pub(crate) type Rows = Vec<Vec<Option<String>>>;

#[derive(Debug)]
pub(crate) enum WireError {
    Io(io::Error),
    /// An `ErrorResponse`: SQLSTATE and message.
    Server {
        code: String,
        message: String,
    },
    Protocol(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Server { code, message } => write!(f, "{message} (SQLSTATE {code})"),
            WireError::Protocol(m) => f.write_str(m),
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

/// An open session.
pub(crate) struct Session {
    stream: BufReader<TcpStream>,
}

impl Session {
    /// Connects and logs in; returns once the server is ready for a query.
    pub(crate) async fn connect(
        addr: SocketAddr,
        user: &str,
        database: &str,
    ) -> Result<Self, WireError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut session = Self {
            stream: BufReader::new(stream),
        };
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (key, value) in [
            ("user", user),
            ("database", database),
            ("application_name", "writethrough-testkit"),
        ] {
            put_cstr(&mut body, key);
            put_cstr(&mut body, value);
        }
        body.push(0);
        let mut message = Vec::with_capacity(body.len() + 4);
        message.extend_from_slice(&len_prefix(body.len()));
        message.extend_from_slice(&body);
        session.stream.get_mut().write_all(&message).await?;

        loop {
            let (tag, body) = session.read_message().await?;
            match tag {
                b'R' => {
                    let method = body
                        .get(..4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or_else(|| WireError::Protocol("short Authentication".into()))?;
                    if method != 0 {
                        return Err(WireError::Protocol(format!(
                            "the server asks for authentication (method {method}); \
                             the testkit's client only speaks trust"
                        )));
                    }
                }
                b'E' => return Err(server_error(&body)),
                b'Z' => return Ok(session),
                // ParameterStatus, BackendKeyData, NoticeResponse.
                _ => {}
            }
        }
    }

    /// Runs `sql` (one or more statements) with the simple query protocol.
    pub(crate) async fn simple_query(&mut self, sql: &str) -> Result<Rows, WireError> {
        if sql.contains('\0') {
            return Err(WireError::Protocol("SQL text contains a NUL byte".into()));
        }
        let mut message = vec![b'Q'];
        message.extend_from_slice(&len_prefix(sql.len() + 1));
        put_cstr(&mut message, sql);
        self.stream.get_mut().write_all(&message).await?;

        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'D' => rows.push(data_row(&body)?),
                b'E' => error = Some(server_error(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                // RowDescription, CommandComplete, EmptyQueryResponse, notices.
                _ => {}
            }
        }
    }

    /// Says goodbye politely, so the server logs no "unexpected EOF".
    pub(crate) async fn close(mut self) {
        let _ = self.stream.get_mut().write_all(&[b'X', 0, 0, 0, 4]).await;
        let _ = self.stream.get_mut().shutdown().await;
    }

    async fn read_message(&mut self) -> Result<(u8, Vec<u8>), WireError> {
        let tag = self.stream.read_u8().await?;
        let len = self.stream.read_i32().await?;
        let len = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_sub(4))
            .filter(|len| *len <= MAX_MESSAGE)
            .ok_or_else(|| WireError::Protocol(format!("bad message length {len}")))?;
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).await?;
        Ok((tag, body))
    }
}

/// A message length field: the body plus the field itself.
fn len_prefix(body_len: usize) -> [u8; 4] {
    i32::try_from(body_len + 4)
        .unwrap_or(i32::MAX)
        .to_be_bytes()
}

fn put_cstr(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
}

fn server_error(body: &[u8]) -> WireError {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    WireError::Server { code, message }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let short = || WireError::Protocol("short DataRow".into());
    let count = body.get(..2).ok_or_else(short)?;
    let count = u16::from_be_bytes([count[0], count[1]]);
    let mut rest = &body[2..];
    let mut row = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = rest.get(..4).ok_or_else(short)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = &rest[4..];
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| short())?;
        let value = rest.get(..len).ok_or_else(short)?;
        row.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[len..];
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_data_row_with_a_null() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"42");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&body).unwrap(), vec![Some("42".to_owned()), None]);
        assert!(data_row(&body[..5]).is_err());
    }

    #[test]
    fn decodes_an_error_response() {
        let body = b"SFATAL\0C57P03\0Mthe database system is starting up\0\0";
        match server_error(body) {
            WireError::Server { code, message } => {
                assert_eq!(code, "57P03");
                assert_eq!(message, "the database system is starting up");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
