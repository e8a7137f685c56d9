fn main() {
    println!("benchmarks: see BENCHMARKS.md");
}
