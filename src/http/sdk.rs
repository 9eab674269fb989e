//! The JavaScript client SDK (`clients/js/src`), embedded in the binary and
//! served at `GET /client.js`, so any page on the relay's origin can
//! `import { Client } from "/client.js"` without a Node toolchain.
//!
//! `/client.js` re-exports `/client/index.js`; the SDK's files are served
//! under `/client/` as they are in the package, so their relative imports
//! resolve the same way in a browser and in Node.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::Response;

use crate::http::response::Body;

/// What `/client.js` answers: the package's entry point, one level down.
const ENTRY: &str =
    "// pgrelay client SDK: see clients/js/README.md\nexport * from \"./client/index.js\";\n";

/// Every module of the SDK, by file name. A unit test checks this list
/// against the package's directory.
pub const FILES: &[(&str, &str)] = &[
    ("index.js", include_str!("../../clients/js/src/index.js")),
    ("api.js", include_str!("../../clients/js/src/api.js")),
    (
        "backoff.js",
        include_str!("../../clients/js/src/backoff.js"),
    ),
    ("codes.js", include_str!("../../clients/js/src/codes.js")),
    (
        "collection.js",
        include_str!("../../clients/js/src/collection.js"),
    ),
    (
        "connection.js",
        include_str!("../../clients/js/src/connection.js"),
    ),
    ("cursor.js", include_str!("../../clients/js/src/cursor.js")),
    (
        "emitter.js",
        include_str!("../../clients/js/src/emitter.js"),
    ),
    ("errors.js", include_str!("../../clients/js/src/errors.js")),
    ("filter.js", include_str!("../../clients/js/src/filter.js")),
    (
        "invalidate.js",
        include_str!("../../clients/js/src/invalidate.js"),
    ),
    ("outbox.js", include_str!("../../clients/js/src/outbox.js")),
    (
        "presence.js",
        include_str!("../../clients/js/src/presence.js"),
    ),
    (
        "subscription.js",
        include_str!("../../clients/js/src/subscription.js"),
    ),
    ("tokens.js", include_str!("../../clients/js/src/tokens.js")),
];

/// `GET /client.js`.
pub fn entry() -> Response<Body> {
    javascript(ENTRY)
}

/// `GET /client/{name}`: one module of the SDK, or `None` for a name that
/// is not one.
pub fn module(name: &str) -> Option<Response<Body>> {
    FILES
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(_, source)| javascript(source))
}

fn javascript(source: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(source.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    // Revalidate on each load: a relay upgrade must not leave pages on an
    // old SDK.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_of_the_package_is_served_as_it_is() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/src");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("reading clients/js/src")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".js"))
            .collect();
        on_disk.sort();
        let mut served: Vec<String> = FILES.iter().map(|(f, _)| f.to_string()).collect();
        served.sort();
        assert_eq!(
            on_disk, served,
            "add new SDK files to FILES in src/http/sdk.rs"
        );
        for (file, source) in FILES {
            let disk = std::fs::read_to_string(dir.join(file)).expect("reading a module");
            assert_eq!(&disk, source, "{file} differs from what is embedded");
        }
    }

    #[test]
    fn every_relative_import_resolves_to_a_served_module() {
        let names: Vec<&str> = FILES.iter().map(|(f, _)| *f).collect();
        for (file, source) in FILES {
            for spec in source.split("from \"./").skip(1) {
                let target = spec.split('"').next().unwrap_or_default();
                assert!(
                    names.contains(&target),
                    "{file} imports ./{target}, which is not served"
                );
            }
        }
        assert!(ENTRY.contains("./client/index.js"));
    }

    #[test]
    fn unknown_modules_are_not_found_and_known_ones_are_javascript() {
        assert!(module("../main.rs").is_none());
        assert!(module("nope.js").is_none());
        let r = module("connection.js").expect("a module");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            entry().headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
    }
}
