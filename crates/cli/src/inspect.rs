//! `writethrough inspect TABLE KEY`: one key's cache entry beside its row.

use serde_json::json;
use writethrough::codec::{self, Decoded};
use writethrough::{ErrorKind, Verdict};

use crate::args::InspectArgs;
use crate::connect::{Target, human, parse_key, row_json};
use crate::{Fatal, Outcome};

pub(crate) async fn run(target: &Target, args: &InspectArgs) -> Result<Outcome, Fatal> {
    let session = target.open().await?;
    let handle = session.table(&args.table).await?;
    let key = parse_key(handle.table(), &args.key)?;
    let seen = handle.inspect(key.clone()).await?;
    let ttl = match session
        .engine
        .raw_cache()
        .time_to_live(&seen.cache_key)
        .await
    {
        Ok(Some(d)) => json!(d.as_secs_f64()),
        Ok(None) if seen.entry.is_some() => json!("never"),
        Ok(None) => json!(null),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            json!(format!(
                "unknown ({} cannot tell)",
                session.engine.cache_name()
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let cache = match seen.entry.as_deref() {
        None => json!({ "kind": "absent" }),
        Some(bytes) => {
            // `expires_in`: seconds, "never", or why it is unknown.
            let mut doc = json!({ "size": bytes.len(), "expires_in": ttl });
            match codec::decode(bytes) {
                Decoded::Corrupt => {
                    doc["kind"] = "corrupt".into();
                    doc["head"] = String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
                        .into_owned()
                        .into();
                }
                Decoded::Tombstone { version, epoch } => {
                    // Byte 3 of the envelope says which (see the codec's docs).
                    doc["kind"] = if bytes[3] == b'I' {
                        "invalidation"
                    } else {
                        "tombstone"
                    }
                    .into();
                    doc["version"] = version.into();
                    doc["epoch"] = epoch.into();
                }
                Decoded::Row {
                    version,
                    epoch,
                    codec: c,
                    payload,
                } => {
                    doc["kind"] = "row".into();
                    doc["version"] = version.into();
                    doc["epoch"] = epoch.into();
                    doc["codec"] = format!("{c:?}").to_lowercase().into();
                    doc["payload"] = match codec::decode_row(c, handle.table(), payload) {
                        Ok(row) => row_json(&row),
                        Err(e) => json!(format!("undecodable: {e}")),
                    };
                }
            }
            doc
        }
    };
    let db = match &seen.row {
        None => json!({ "row": null }),
        Some(vr) => json!({ "version": vr.version, "row": row_json(&vr.row) }),
    };
    let verdict = match seen.verdict {
        Verdict::Agree => "agree".to_owned(),
        Verdict::Absent => "absent (no usable entry: the next read loads the row)".to_owned(),
        Verdict::Divergent(kind) => format!("DIVERGENT: {}", kind.as_str()),
        _ => format!("{:?}", seen.verdict),
    };
    if args.json {
        let doc = json!({
            "table": args.table,
            "key": crate::connect::key_json(&key),
            "cache_key": seen.cache_key,
            "cache": cache,
            "database": db,
            "verdict": seen.verdict,
        });
        println!("{doc:#}");
    } else {
        println!(
            "table {} key {key} (cache key {})",
            args.table, seen.cache_key
        );
        println!("cache     {}", describe_entry(&cache));
        if let Some(p) = cache.get("payload") {
            println!("          {p}");
        }
        match &seen.row {
            Some(vr) => {
                println!("database  version {}", vr.version);
                println!("          {}", row_json(&vr.row));
            }
            None => println!("database  no row"),
        }
        println!("verdict   {verdict}");
    }
    session.engine.shutdown().await?;
    Ok(match seen.verdict {
        Verdict::Divergent(_) => Outcome::Divergent,
        _ => Outcome::Clean,
    })
}

fn describe_entry(doc: &serde_json::Value) -> String {
    let mut parts = vec![doc["kind"].as_str().unwrap_or("?").to_owned()];
    if let Some(v) = doc.get("version") {
        parts.push(format!("version {v}"));
    }
    if let Some(e) = doc.get("epoch") {
        parts.push(format!("epoch {e}"));
    }
    if let Some(c) = doc.get("codec").and_then(|c| c.as_str()) {
        parts.push(format!("codec {c}"));
    }
    if let Some(n) = doc.get("size") {
        parts.push(format!("{n} bytes"));
    }
    match doc.get("expires_in") {
        Some(serde_json::Value::Number(s)) => parts.push(format!(
            "TTL left {}",
            human(std::time::Duration::from_secs_f64(
                s.as_f64().unwrap_or(0.0)
            ))
        )),
        Some(serde_json::Value::String(s)) if s == "never" => parts.push("no TTL".to_owned()),
        Some(serde_json::Value::String(s)) => parts.push(format!("TTL {s}")),
        _ => {}
    }
    if let Some(h) = doc.get("head").and_then(|h| h.as_str()) {
        parts.push(format!("starts {h:?}"));
    }
    parts.join(", ")
}
