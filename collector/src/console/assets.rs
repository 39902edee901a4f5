//! The console's static files, built into the binary: our script and style sheet, and the
//! vendored libraries with their licences (htmx 2.0.11, 0BSD; uPlot 1.6.32, MIT; decision
//! 0075). Names carry the version, so answers may be cached for a long time.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file.
struct Asset {
    name: &'static str,
    mime: &'static str,
    bytes: &'static [u8],
    /// True when its name changes with its content (vendored, versioned).
    immutable: bool,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "console.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/console.js"),
        immutable: false,
    },
    Asset {
        name: "console.css",
        mime: "text/css; charset=utf-8",
        bytes: include_bytes!("assets/console.css"),
        immutable: false,
    },
    Asset {
        name: "htmx-2.0.11.min.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/htmx-2.0.11.min.js"),
        immutable: true,
    },
    Asset {
        name: "uPlot-1.6.32.iife.min.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/uPlot-1.6.32.iife.min.js"),
        immutable: true,
    },
    Asset {
        name: "uPlot-1.6.32.min.css",
        mime: "text/css; charset=utf-8",
        bytes: include_bytes!("assets/uPlot-1.6.32.min.css"),
        immutable: true,
    },
    Asset {
        name: "htmx-LICENSE",
        mime: "text/plain; charset=utf-8",
        bytes: include_bytes!("assets/htmx-LICENSE"),
        immutable: true,
    },
    Asset {
        name: "uPlot-LICENSE",
        mime: "text/plain; charset=utf-8",
        bytes: include_bytes!("assets/uPlot-LICENSE"),
        immutable: true,
    },
];

pub(super) async fn serve(Path(name): Path<String>) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let mut r = ([(header::CONTENT_TYPE, a.mime)], a.bytes).into_response();
    super::secure(r.headers_mut());
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if a.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    r
}
