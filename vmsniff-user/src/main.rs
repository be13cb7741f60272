fn main() {
    let bytes = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vmsniff"));
    let ebpf = aya::Ebpf::load(bytes).unwrap();
    for (n, _) in ebpf.programs() { println!("{n}"); }
    for (n, _) in ebpf.maps() { println!("{n}"); }
}
