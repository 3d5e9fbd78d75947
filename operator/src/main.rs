fn main() {
    print!("{}", l4proxy_operator::crd::crd_yaml());
}
