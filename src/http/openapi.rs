//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers'
//! annotations (utoipa) and served at `/api/v1/openapi.json`.

use std::sync::LazyLock;

use actix_web::HttpResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "Live-notification broker: publish over HTTP, subscribe over WebSocket (`GET /ws`) or as an SSE/NDJSON stream (`Accept: text/event-stream` on the history route, `GET /api/v1/stream`); both in docs/protocol.md."
    ),
    paths(
        super::publish::publish_one,
        super::publish::publish_batch,
        super::history::history,
        super::presence::presence,
        super::introspect::node,
        super::introspect::topic,
        super::healthz,
        super::readyz,
    ),
    modifiers(&BearerJwt),
)]
struct ApiDoc;

/// Declares the `bearer` security scheme the paths refer to.
struct BearerJwt;

impl Modify for BearerJwt {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Rendered once: the document is fixed at build time.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        // Serializing a tree of plain maps and strings cannot fail.
        .expect("the OpenAPI document serializes")
});

pub(super) async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT.as_str())
}
