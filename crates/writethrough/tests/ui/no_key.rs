use serde::{Deserialize, Serialize};
use writethrough::Entity;

#[derive(Entity, Serialize, Deserialize)]
struct Note {
    title: String,
    body: String,
}

#[derive(Entity, Serialize, Deserialize)]
struct Tagged {
    #[writethrough(key)]
    id: Option<i64>,
}

fn main() {}
