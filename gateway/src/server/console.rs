//! The web console at `/console/`: static pages built into the binary (an
//! air-gapped install serves them too) that call the public HTTP API with
//! the token the user signs in with. The gateway gives the console nothing
//! the API does not: what a page shows is what its token may read.

use axum::response::{IntoResponse, Redirect};
use hyper::StatusCode;

use super::{ApiError, Response};

/// A file of the console: its name under `/console/`, media type and content.
struct Asset {
    name: &'static str,
    media_type: &'static str,
    content: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

macro_rules! asset {
    ($name:literal, $media_type:expr) => {
        Asset {
            name: $name,
            media_type: $media_type,
            content: include_str!(concat!("../../console/", $name)),
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!("index.html", HTML),
    asset!("console.css", CSS),
    asset!("console.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("charts.js", JS),
    asset!("functions.js", JS),
    asset!("playground.js", JS),
    asset!("account.js", JS),
    asset!("fleet.js", JS),
    asset!("tenants.js", JS),
];

/// Everything from this origin and nothing else: no inline script or
/// style, no third-party fonts or CDNs, never framed.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; object-src 'none'; \
                      base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/console`: the console lives under `/console/` (its files are relative to it).
pub(super) async fn root() -> Redirect {
    Redirect::permanent("/console/")
}

/// `/console/` and `/console/{file}`.
pub(super) async fn file(name: Option<&str>) -> Result<Response, ApiError> {
    let name = name.filter(|n| !n.is_empty()).unwrap_or("index.html");
    let asset = ASSETS
        .iter()
        .find(|asset| asset.name == name)
        .ok_or_else(|| ApiError::not_found(format!("the console has no file {name:?}")))?;
    Ok((
        StatusCode::OK,
        [
            ("content-type", asset.media_type),
            ("content-security-policy", POLICY),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            // Small, and replaced with the binary: revalidated every time.
            ("cache-control", "no-cache"),
        ],
        asset.content,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_loads_is_served() {
        let index = ASSETS[0].content;
        for asset in &ASSETS[1..] {
            let loaded = index.contains(&format!("/console/{}", asset.name))
                || ASSETS
                    .iter()
                    .any(|a| a.content.contains(&format!("./{}", asset.name)));
            assert!(loaded, "{} is embedded but nothing loads it", asset.name);
        }
    }

    #[test]
    fn every_file_of_the_console_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                ASSETS.iter().any(|asset| asset.name == name),
                "console/{name} is not in ASSETS"
            );
        }
    }

    #[test]
    fn no_page_reaches_outside_the_gateway() {
        for asset in ASSETS {
            // A namespace name, never fetched.
            let content = asset.content.replace("http://www.w3.org/2000/svg", "");
            for scheme in ["http://", "https://", "//fonts.", "//cdn"] {
                assert!(
                    !content.contains(scheme),
                    "{} mentions {scheme}: the console loads nothing from elsewhere",
                    asset.name
                );
            }
        }
    }
}
