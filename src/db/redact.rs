//! Connection strings fit for a log line: every password hidden, in every
//! form libpq and tokio-postgres (which the relay connects with) accept.
//!
//! - A URL (`postgresql://` or `postgres://`): the password of the userinfo
//!   (`user:password@`), and the query parameters `password` and
//!   `sslpassword` (`?password=...`, `&password=...`, the key possibly
//!   percent-encoded).
//! - A key/value string (`host=db password=...`): the values of `password`
//!   and `sslpassword`, unquoted (ending at whitespace, `\` escaping the
//!   next character) or single-quoted (`'a b\'c'`), with optional spaces
//!   around `=`.
//!
//! Each hidden value becomes `***`; everything else is kept byte for byte.
//! Where the parsers read a string differently, whatever either of them
//! could take for a password is hidden: tokio-postgres takes everything
//! before the first `@` of a URL for the userinfo (libpq stops at a `/`
//! first), so `postgresql://db:5432/x?password=p@ss` is shown as
//! `postgresql://db:***`.

use std::ops::Range;

/// What stands in for a hidden value.
const HIDDEN: &str = "***";

/// The keywords whose values are secrets. `sslpassword` is libpq's (the
/// passphrase of the client key); tokio-postgres refuses it, but a string
/// written for libpq may carry it.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

/// `conninfo` with every password replaced by `***`.
pub fn redact(conninfo: &str) -> String {
    let hidden = match url_rest(conninfo) {
        Some(rest_start) => url_secrets(conninfo, rest_start),
        None => key_value_secrets(conninfo),
    };
    replace(conninfo, hidden)
}

/// Where the part after `scheme://` starts, if `s` is a URL. libpq and
/// tokio-postgres accept only `postgresql://` and `postgres://`; any
/// other scheme is treated as a URL too, so that a stranger string is not
/// read as key/value pairs.
fn url_rest(s: &str) -> Option<usize> {
    let end = s.find("://")?;
    let scheme = &s[..end];
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then_some(end + 3)
}

/// The byte ranges of a URL's secrets.
fn url_secrets(url: &str, rest_start: usize) -> Vec<Range<usize>> {
    let rest = &url[rest_start..];
    let mut hidden = Vec::new();
    // Userinfo: tokio-postgres reads up to the first '@' and splits user
    // from password at the first ':' (libpq reads the same, unless a '/'
    // comes before the '@', and then has no userinfo at all).
    if let Some(at) = rest.find('@') {
        if let Some(colon) = rest[..at].find(':') {
            hidden.push(rest_start + colon + 1..rest_start + at);
        }
    }
    // Query parameters: a key starts after any '?' or '&' and ends at '=';
    // its value runs to the next '&' (both parsers split only on '&').
    for (i, c) in rest.char_indices() {
        if c != '?' && c != '&' {
            continue;
        }
        let key_start = i + 1;
        let Some(eq) = rest[key_start..].find('=').map(|e| key_start + e) else {
            continue;
        };
        let key = &rest[key_start..eq];
        if key.contains(['&', '?']) || !is_secret_key(&percent_decode(key)) {
            continue;
        }
        let value_end = rest[eq + 1..].find('&').map_or(rest.len(), |e| eq + 1 + e);
        hidden.push(rest_start + eq + 1..rest_start + value_end);
    }
    hidden
}

/// The byte ranges of a key/value string's secrets, read as libpq reads
/// it (`conninfo_parse`): blanks, a keyword up to blank or `=`, blanks,
/// `=`, blanks, then a value, single-quoted or up to the next blank, with
/// `\` escaping the next character in both. A word without `=` (which
/// both parsers refuse) is skipped; an unterminated quote hides the rest.
fn key_value_secrets(s: &str) -> Vec<Range<usize>> {
    let bytes = s.as_bytes();
    let blank = |i: usize| bytes.get(i).is_some_and(|b| b.is_ascii_whitespace());
    let skip_blanks = |mut i: usize| {
        while blank(i) {
            i += 1;
        }
        i
    };
    let mut hidden = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        i = skip_blanks(i);
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !blank(i) {
            i += 1;
        }
        let key = &s[key_start..i];
        i = skip_blanks(i);
        if bytes.get(i) != Some(&b'=') {
            // Not a pair: go on with the next word.
            continue;
        }
        i = skip_blanks(i + 1);
        let value_start = i;
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => break,
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < bytes.len() && !blank(i) {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
        }
        i = i.min(bytes.len());
        if is_secret_key(key) {
            hidden.push(value_start..i);
        }
    }
    hidden
}

fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// `%XX` decoded (as both parsers decode URL keys); anything else as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` with each range (merged where they overlap) replaced by [`HIDDEN`].
fn replace(s: &str, mut hidden: Vec<Range<usize>>) -> String {
    hidden.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(s.len());
    let mut kept_from = 0;
    for range in hidden {
        if range.start < kept_from {
            // Overlaps the previous range: extend it.
            kept_from = kept_from.max(range.end);
            continue;
        }
        out.push_str(&s[kept_from..range.start]);
        out.push_str(HIDDEN);
        kept_from = range.end;
    }
    out.push_str(&s[kept_from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    // URLs: the password of the userinfo.
    #[test]
    fn url_userinfo_password_is_hidden() {
        assert_eq!(
            redact("postgresql://app:s3cret@db:5432/x"),
            "postgresql://app:***@db:5432/x"
        );
        assert_eq!(
            redact("postgres://app:s3cret@db/x?sslmode=require"),
            "postgres://app:***@db/x?sslmode=require"
        );
        // Several hosts: only the userinfo before the first '@' is secret.
        assert_eq!(
            redact("postgresql://app:pw@h1:5432,h2:5433/x?target_session_attrs=read-write"),
            "postgresql://app:***@h1:5432,h2:5433/x?target_session_attrs=read-write"
        );
        // Percent-encoded, or with a ':' or '/' unencoded (tokio-postgres
        // reads up to the first '@' and splits at the first ':').
        assert_eq!(
            redact("postgresql://app:p%40ss%3Aw@db/x"),
            "postgresql://app:***@db/x"
        );
        assert_eq!(
            redact("postgresql://app:a:b/c?d@db/x"),
            "postgresql://app:***@db/x"
        );
        // An empty password is still a password field.
        assert_eq!(
            redact("postgresql://app:@db/x"),
            "postgresql://app:***@db/x"
        );
    }

    // URLs: `password` (and libpq's `sslpassword`) as query parameters.
    #[test]
    fn url_query_password_is_hidden() {
        assert_eq!(
            redact("postgresql://db/x?user=app&password=s3cret"),
            "postgresql://db/x?user=app&password=***"
        );
        assert_eq!(
            redact("postgresql://db/x?password=s3cret&sslmode=require"),
            "postgresql://db/x?password=***&sslmode=require"
        );
        // A port before the path, as in most URLs.
        assert_eq!(
            redact("postgresql://db:5432/x?password=s3cret"),
            "postgresql://db:5432/x?password=***"
        );
        // The key percent-encoded (both parsers decode keys).
        assert_eq!(
            redact("postgresql://db/x?pass%77ord=s3cret"),
            "postgresql://db/x?pass%77ord=***"
        );
        assert_eq!(
            redact("postgresql://db/x?sslmode=verify-full&sslpassword=k3y&application_name=a"),
            "postgresql://db/x?sslmode=verify-full&sslpassword=***&application_name=a"
        );
        // Userinfo and query both.
        assert_eq!(
            redact("postgresql://app:one@db/x?password=two"),
            "postgresql://app:***@db/x?password=***"
        );
        // An '@' in the value: libpq reads no userinfo (a '/' comes first),
        // tokio-postgres reads `db/x?password=p` as the user.
        assert_eq!(
            redact("postgresql://db/x?password=p@ss"),
            "postgresql://db/x?password=***"
        );
        // Here tokio-postgres would take `5432/x?password=p` for the
        // userinfo's password: hide what either parser could take.
        assert_eq!(
            redact("postgresql://db:5432/x?password=p@ss"),
            "postgresql://db:***"
        );
        // No host at all: libpq's default socket.
        assert_eq!(
            redact("postgresql:///x?password=s3cret"),
            "postgresql:///x?password=***"
        );
    }

    // libpq's key=value strings, with the quoting and escapes it allows.
    #[test]
    fn key_value_password_is_hidden() {
        assert_eq!(
            redact("host=db user=app password=s3cret dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
        assert_eq!(
            redact("host=db password = s3cret"),
            "host=db password = ***"
        );
        assert_eq!(
            redact(r"host=db password='a b\'c' dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(redact(r"password=a\ b dbname=x"), "password=*** dbname=x");
        assert_eq!(
            redact("host=db\tpassword=s3cret\nuser=app"),
            "host=db\tpassword=***\nuser=app"
        );
        assert_eq!(
            redact("user=jürgen password=pässwörd host=db"),
            "user=jürgen password=*** host=db"
        );
        assert_eq!(redact(r"password='\ä\'' user=app"), "password=*** user=app");
        assert_eq!(redact("password=''  user=app"), "password=***  user=app");
        assert_eq!(
            redact("sslkey=/k.pem sslpassword=k3y host=db"),
            "sslkey=/k.pem sslpassword=*** host=db"
        );
        // An unterminated quote: everything after it could be the secret.
        assert_eq!(
            redact("host=db password='s3cret user=app"),
            "host=db password=***"
        );
    }

    #[test]
    fn what_holds_no_password_is_unchanged() {
        for s in [
            "postgresql://app@db/x",
            "postgresql://db:5432/x",
            "postgresql://[::1]:5432/x?sslmode=disable",
            "postgresql://app@[::1]:5432/x",
            "postgresql://db/x?application_name=passwordless&passfile=/p",
            "postgresql://db/x?user=password",
            "postgresql:///x?host=/run/postgresql",
            "host=db user=app",
            "host=db user=password dbname=passwords",
            "passfile=/home/app/.pgpass host=db",
            r"host=db application_name='password=x'",
            "",
        ] {
            assert_eq!(redact(s), s, "{s:?} has no password to hide");
        }
    }
}
