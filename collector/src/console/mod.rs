//! The web console: pages for billing and support people, served on the admin address beside
//! the API (`/console/…`; `/` redirects there), built into the binary.
//!
//! Owns the page shell, the page fragments and the vendored assets ([`assets`]). The pages hold
//! no data and need no token: the browser signs in with the admin token (kept in the tab's
//! `sessionStorage`), then `console.js` reads the same JSON admin API scripts use, sending the
//! token as the bearer token. Navigation swaps fragments with htmx (`HX-Request` answers the
//! fragment alone, a plain request the whole page), so every page has its own URL that reloads.
//! Decisions 0075–0079.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

pub mod assets;

/// One page of the console.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Its path under `/console/`.
    pub slug: &'static str,
    /// Its title (also the navigation label).
    pub title: &'static str,
    body: &'static str,
}

/// The pages in navigation order (the customer page is reached from Customers).
pub const PAGES: &[Page] = &[
    Page {
        slug: "overview",
        title: "Overview",
        body: include_str!("pages/overview.html"),
    },
    Page {
        slug: "customers",
        title: "Customers",
        body: include_str!("pages/customers.html"),
    },
    Page {
        slug: "meters",
        title: "Meters",
        body: include_str!("pages/meters.html"),
    },
    Page {
        slug: "agents",
        title: "Agents",
        body: include_str!("pages/agents.html"),
    },
    Page {
        slug: "stripe",
        title: "Stripe",
        body: include_str!("pages/stripe.html"),
    },
    Page {
        slug: "quarantine",
        title: "Quarantine",
        body: include_str!("pages/quarantine.html"),
    },
];

const CUSTOMER: &str = include_str!("pages/customer.html");
const SHELL: &str = include_str!("pages/shell.html");

/// The console's routes (no token: they serve only markup and assets).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route(
            "/console/",
            get(|h: HeaderMap| async move { page(&h, "overview") }),
        )
        .route(
            "/console/{page}",
            get(|h: HeaderMap, Path(p): Path<String>| async move { page(&h, &p) }),
        )
        .route(
            "/console/customers/{customer}",
            get(|h: HeaderMap, Path(c): Path<String>| async move { customer_page(&h, &c) }),
        )
        .route("/console/assets/{file}", get(assets::serve))
}

fn page(headers: &HeaderMap, slug: &str) -> Response {
    match PAGES.iter().find(|p| p.slug == slug) {
        Some(p) => answer(headers, p.slug, p.title, p.body.to_owned()),
        None => not_found(headers),
    }
}

fn customer_page(headers: &HeaderMap, customer: &str) -> Response {
    if tally_protocol::names::CustomerId::new(customer).is_err() {
        return not_found(headers);
    }
    let body = CUSTOMER.replace("{{customer}}", &escape(customer));
    answer(headers, "customers", &format!("Customer {customer}"), body)
}

fn not_found(headers: &HeaderMap) -> Response {
    let body = String::from(
        r#"<section data-page="missing"><h1>Not found</h1><p>No such page. <a href="/console/">Overview</a></p></section>"#,
    );
    let mut r = answer(headers, "", "Not found", body);
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// The fragment alone for htmx's swaps, else the whole page around it.
fn answer(headers: &HeaderMap, current: &str, title: &str, body: String) -> Response {
    let swap =
        headers.contains_key("hx-request") && !headers.contains_key("hx-history-restore-request");
    let html = if swap {
        format!("<title>Tally · {}</title>\n{body}", escape(title))
    } else {
        shell(current, title, &body)
    };
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    secure(r.headers_mut());
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("HX-Request"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The shell: header, navigation, sign-in form and the page.
pub fn shell(current: &str, title: &str, body: &str) -> String {
    let nav: String = PAGES
        .iter()
        .map(|p| {
            let cur = if p.slug == current {
                r#" aria-current="page""#
            } else {
                ""
            };
            format!(
                r#"<li><a href="/console/{}"{cur}>{}</a></li>"#,
                p.slug, p.title
            )
        })
        .collect();
    SHELL
        .replace("{{title}}", &escape(title))
        .replace("{{nav}}", &nav)
        .replace("{{main}}", body)
}

/// Headers every console answer carries: scripts only from here, no framing, no referrer.
pub(crate) fn secure(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// Escapes text for HTML content and attribute values.
///
/// ```
/// assert_eq!(tally_collector::console::escape(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
/// ```
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_has_its_marker_and_no_inline_script() {
        for p in PAGES {
            assert!(
                p.body.contains(&format!(r#"data-page="{}""#, p.slug)),
                "{}",
                p.slug
            );
        }
        let all = PAGES.iter().map(|p| p.body).chain([CUSTOMER, SHELL]);
        for b in all {
            // The content security policy allows scripts only from files.
            assert!(!b.contains("<script>"), "inline script");
            assert!(!b.contains(" onclick="), "inline handler");
            assert!(!b.contains(" style="), "inline style");
        }
    }
}
