//! An HTTP handler that imports an interface no platform provides:
//! deploying it must be refused, naming the import.

use gigafactory_sdk::http::{Handler, Request, Response};

wit_bindgen::generate!({
    inline: "
        package acme:missing;
        interface oracle { ask: func() -> string; }
        world needs-oracle { import oracle; }
    ",
    world: "needs-oracle",
});

struct Asker;

impl Handler for Asker {
    fn handle(_request: Request) -> Response {
        Response::text(200, acme::missing::oracle::ask())
    }
}

gigafactory_sdk::export_handler!(Asker);
