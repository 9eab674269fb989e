//! What the routes read from a request: the client's token and
//! percent-encoded query values. Shared by `/ws` and `/v1`, below both.

/// The token of an upgrade request: the `Authorization: Bearer` header
/// first, then the `token` query parameter.
pub fn token_from_request<B>(req: &hyper::Request<B>) -> Option<String> {
    if let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) {
        if let Ok(text) = value.to_str() {
            if let Some(token) = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
            {
                let token = token.trim();
                if !token.is_empty() {
                    return Some(token.to_string());
                }
            }
        }
    }
    let query = req.uri().query()?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == "token" && !value.is_empty()).then(|| percent_decode(value, true))
    })
}

/// Decodes `%XX` escapes (and, in query strings, `+` as space). Invalid
/// escapes are kept as they are; invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str, plus_as_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if plus_as_space && bytes[i] == b'+' {
            b' '
        } else {
            bytes[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_tokens_are_found_and_decoded() {
        let req = hyper::Request::builder()
            .uri("/ws?x=1&token=a%2Eb.c")
            .body(())
            .expect("request");
        assert_eq!(token_from_request(&req).as_deref(), Some("a.b.c"));
        let req = hyper::Request::builder()
            .uri("/ws?token=q")
            .header("authorization", "Bearer h")
            .body(())
            .expect("request");
        assert_eq!(token_from_request(&req).as_deref(), Some("h"));
        let req = hyper::Request::builder()
            .uri("/ws")
            .body(())
            .expect("request");
        assert_eq!(token_from_request(&req), None);
    }

    #[test]
    fn escapes_decode_and_bad_ones_stay() {
        assert_eq!(percent_decode("a%20b+c", true), "a b c");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("%zz", true), "%zz");
    }
}
