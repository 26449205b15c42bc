use serde::{Deserialize, Serialize};
use writethrough::Entity;

#[derive(Entity, Serialize, Deserialize)]
struct Order {
    id: i64,
    lines: Vec<String>,
}

fn main() {}
