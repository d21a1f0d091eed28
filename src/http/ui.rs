//! The live console page (`GET /`) and the JavaScript client it uses
//! (`GET /herald.js`), both shipped inside the binary. Served when
//! `ui.enabled` is set (always in `serve --dev`).

use actix_web::http::header;
use actix_web::{HttpResponse, web};

const PAGE: &str = include_str!("../ui/index.html");
const CLIENT: &str = include_str!("../../clients/js/herald.js");

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(super::resource("/", "GET").route(web::get().to(page)))
        .service(super::resource("/herald.js", "GET").route(web::get().to(client)));
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
