//! The fenced write: a Lua script that applies `codec::replaces` on the server.
//!
//! The script reads only the 39 header bytes that carry the version and epoch
//! (`STRLEN` + `GETRANGE`), so fencing a large entry does not copy it into
//! the Lua interpreter. It compares versions as two exact 10-digit halves:
//! Lua 5.1 numbers are doubles, exact only to 2^53, and a 20-digit version
//! goes up to 1.8e19. It never compares strings by collation (Redis sets
//! `LC_COLLATE` from its environment) nor uses `%d` (which follows the C
//! locale): digits are checked with the byte range `[0-9]`.

use std::sync::LazyLock;

use redis::Cmd;
use writethrough_core::backend::CacheItem;

/// Every key of `KEYS` in order, each with five arguments at
/// `ARGV[5(i-1)+1..=5i]`: the entry; the new version's high and low 10
/// decimal digits; the TTL in milliseconds, `0` for none; the new entry's
/// epoch (at most 10 digits, exact as a double). Returns one integer per
/// key: 1 when stored, 0 when stale. One call fences a whole batch (a key
/// given twice is fenced twice, in order), so a batch costs Redis one
/// script run instead of one per key.
pub(crate) const FENCED_SET: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 5
  local stale = false
  local len = redis.pcall('STRLEN', key)
  -- A key of another type answers STRLEN with an error table: not an entry, replace it.
  if type(len) == 'number' and len >= 39 then
    local h = redis.call('GETRANGE', key, 0, 38)
    local kind = string.sub(h, 4, 4)
    if string.sub(h, 1, 3) == 'wt2' and (kind == 'V' or kind == 'T' or kind == 'I')
        and string.find(string.sub(h, 5, 24), '^[0-9]+$')
        and string.find(string.sub(h, 30, 39), '^[0-9]+$') then
      local hi = tonumber(string.sub(h, 5, 14))
      local lo = tonumber(string.sub(h, 15, 24))
      local epoch = tonumber(string.sub(h, 30, 39))
      local new_epoch = tonumber(ARGV[a + 5])
      -- Twenty digits above u64::MAX (18446744073709551615) are not a version
      -- the codec reads: such an entry is corrupt and gets replaced.
      if hi < 1844674407 or (hi == 1844674407 and lo <= 3709551615) then
        local new_hi = tonumber(ARGV[a + 2])
        local new_lo = tonumber(ARGV[a + 3])
        -- Versions first; at the same version an invalidation ('I') lets the
        -- row of its version in, and so does an earlier epoch.
        if hi > new_hi or (hi == new_hi and (lo > new_lo or (lo == new_lo
            and kind ~= 'I' and epoch >= new_epoch))) then
          stale = true
        end
      end
    end
  end
  if stale then
    out[i] = 0
  else
    if ARGV[a + 4] ~= '0' then
      redis.call('SET', key, ARGV[a + 1], 'PX', ARGV[a + 4])
    else
      redis.call('SET', key, ARGV[a + 1])
    end
    out[i] = 1
  end
end
return out
"#;

/// `KEYS[1]` the key; `ARGV[1]` the bytes expected; `ARGV[2]` the new
/// entry; `ARGV[3]` the TTL in milliseconds, `0` for none. Returns 1 when
/// the key held exactly the expected bytes and now holds the new entry, 0
/// otherwise. Lua compares strings for equality byte for byte (interned
/// strings), never by collation.
pub(crate) const REPLACE_IF_UNCHANGED: &str = r#"
local key = KEYS[1]
local cur = redis.pcall('GET', key)
if type(cur) ~= 'string' or cur ~= ARGV[1] then
  return 0
end
if ARGV[3] ~= '0' then
  redis.call('SET', key, ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', key, ARGV[2])
end
return 1
"#;

/// The fenced write, with its SHA-1 computed once.
pub(crate) static FENCE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(FENCED_SET));

/// The compare-and-set on bytes, with its SHA-1 computed once.
pub(crate) static REPLACE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(REPLACE_IF_UNCHANGED));

const HALF: u64 = 10_000_000_000;

/// Most keys one call of the fencing script carries: a bigger batch is
/// several calls in one pipeline, so that no call holds the server long.
pub(crate) const FENCE_KEYS_PER_CALL: usize = 128;

/// One `EVALSHA` of the fenced write for `items` with their TTLs (already
/// in milliseconds).
pub(crate) fn fenced_set(items: &[CacheItem], ttls_ms: &[u64]) -> Cmd {
    let sha = FENCE.get_hash();
    let len: usize = items
        .iter()
        .map(|it| it.key.len() + it.entry.len() + 64)
        .sum();
    let mut cmd = Cmd::with_capacity(3 + 6 * items.len(), 16 + sha.len() + len);
    cmd.arg("EVALSHA").arg(sha).arg(items.len());
    for it in items {
        cmd.arg(&it.key);
    }
    for (it, &ttl) in items.iter().zip(ttls_ms) {
        cmd.arg(&it.entry[..])
            .arg(it.version / HALF)
            .arg(it.version % HALF)
            .arg(ttl)
            .arg(it.epoch());
    }
    cmd
}

/// `EVALSHA` of the compare-and-set on bytes.
pub(crate) fn replace_if_unchanged(expected: &[u8], item: &CacheItem, ttl_ms: u64) -> Cmd {
    let mut cmd = evalsha(&REPLACE, &item.key, 64 + expected.len() + item.entry.len());
    cmd.arg(expected).arg(&item.entry[..]).arg(ttl_ms);
    cmd
}

fn evalsha(script: &redis::Script, key: &str, args_len: usize) -> Cmd {
    let sha = script.get_hash();
    let mut cmd = Cmd::with_capacity(8, 16 + sha.len() + key.len() + args_len);
    cmd.arg("EVALSHA").arg(sha).arg(1).arg(key);
    cmd
}

/// `SCRIPT LOAD` of `script`.
pub(crate) fn load(script: &'static str) -> Cmd {
    let mut cmd = Cmd::with_capacity(3, script.len() + 16);
    cmd.arg("SCRIPT").arg("LOAD").arg(script);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_split_into_exact_ten_digit_halves() {
        for v in [0, 1, HALF - 1, HALF, u64::MAX] {
            let (hi, lo) = (v / HALF, v % HALF);
            assert!(hi < (1 << 53) && lo < (1 << 53));
            assert_eq!(hi * HALF + lo, v);
        }
        assert_eq!(u64::MAX / HALF, 1_844_674_407);
        assert_eq!(u64::MAX % HALF, 3_709_551_615);
    }

    #[test]
    fn the_script_bounds_match_the_largest_version() {
        assert!(FENCED_SET.contains(&(u64::MAX / HALF).to_string()));
        assert!(FENCED_SET.contains(&(u64::MAX % HALF).to_string()));
        assert!(FENCED_SET.contains(&format!(
            "len >= {}",
            writethrough_core::backend::codec::HEADER_LEN
        )));
    }
}
