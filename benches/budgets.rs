//! What the read budgets cost on the GetRecord path: one server, one
//! clinician, 16 concurrent gRPC clients, rounds alternating budgets on
//! (roomy limits, so every read does the full check and spend, durably)
//! and off, in the same process, so the ratio is measured under the same
//! noise. Then the check alone, without gRPC. `cargo bench --bench budgets`.

mod support;

use std::time::{Duration, Instant};

use coffre::{budgets::Read, model::RecordId};

const CLIENTS: usize = 16;
const SECONDS: u64 = 5;
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let Some(rt) = support::runtime_if_measuring() else {
        return;
    };
    rt.block_on(async {
        let b = support::start(support::ROOMY_LIMITS, |b| b).await;
        // Warm up connections, caches and the budget state.
        b.get_load(CLIENTS, Duration::from_secs(2)).await;
        let (mut on, mut off, mut on_p99, mut off_p99) = (vec![], vec![], vec![], vec![]);
        for round in 0..ROUNDS {
            for enforce in [true, false] {
                b.vault.budgets.set_enforced(enforce);
                let l = b.get_load(CLIENTS, Duration::from_secs(SECONDS)).await;
                println!(
                    "round {round} budgets {:<3}: {:>7.0} req/s  p50 {:.2} ms  p99 {:.2} ms",
                    if enforce { "on" } else { "off" },
                    l.rps,
                    l.p50_ms,
                    l.p99_ms
                );
                if enforce {
                    on.push(l.rps);
                    on_p99.push(l.p99_ms);
                } else {
                    off.push(l.rps);
                    off_p99.push(l.p99_ms);
                }
            }
        }
        let (on, off) = (median(on), median(off));
        println!(
            "GetRecord, {CLIENTS} clients, median of {ROUNDS} rounds of {SECONDS} s: \
             budgets on {on:.0} req/s (p99 {:.2} ms), off {off:.0} req/s (p99 {:.2} ms); \
             cost of the check: {:.1} % of throughput",
            median(on_p99),
            median(off_p99),
            (1.0 - on / off) * 100.0
        );

        // The check and spend alone, on one thread: what each read pays.
        b.vault.budgets.set_enforced(true);
        let caller = b
            .vault
            .accounts
            .authenticate(&b.token)
            .await
            .expect("the bench token is valid");
        let ids: Vec<RecordId> = (0..support::RECORDS)
            .map(|i| RecordId::parse(&format!("p{i}")).unwrap())
            .collect();
        let n = 200_000;
        let start = Instant::now();
        for i in 0..n {
            b.vault
                .budgets
                .spend_read(&caller, Read::Record(&ids[i % ids.len()]))
                .await
                .unwrap()
                .unwrap();
        }
        let per = start.elapsed().as_secs_f64() / n as f64 * 1e6;
        println!(
            "Budgets::spend_read alone: {per:.2} µs per read ({:.0} reads/s on one core)",
            1.0 / per * 1e6
        );
        b.stop().await;
    });
}
