//! Distribution v2 client (written in the registry task).
