//! The live console page (`GET /`) and the JavaScript client it uses
//! (`GET /herald.js`), both shipped inside the binary. Served when
//! `ui.enabled` is set (always in `serve --dev`).

use actix_web::http::header;
use actix_web::{HttpResponse, web};

const PAGE: &str = include_str!("../ui/index.html");
const CLIENT: &str = include_str!("../../clients/js/herald.js");
/// Where the JS client is served (apps on other origins may import it).
pub(crate) const CLIENT_PATH: &str = "/herald.js";
/// Herald's icon: a bell, drawn in SVG (browsers take SVG at this path).
const ICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#2f5bd3"/><path d="M16 6a7 7 0 0 0-7 7v5l-2 3h18l-2-3v-5a7 7 0 0 0-7-7zm-3 17a3 3 0 0 0 6 0z" fill="#fff"/></svg>"##;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(super::resource("/", "GET").route(web::get().to(page)))
        .service(super::resource(CLIENT_PATH, "GET").route(web::get().to(client)))
        .service(super::resource("/favicon.ico", "GET").route(web::get().to(icon)));
}

async fn icon() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("image/svg+xml")
        .insert_header((header::CACHE_CONTROL, "max-age=86400"))
        .body(ICON)
}

async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(PAGE)
}

async fn client() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(CLIENT)
}
