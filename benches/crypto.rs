//! Criterion benchmarks of the data path without the network: field
//! encryption and decryption by size, and a ten-field record put (durable,
//! through sled) and get (decrypting all ten fields).

use std::{hint::black_box, sync::Arc};

use coffre::{
    accounts::Hasher,
    config::Argon2Config,
    crypto::SecretKey,
    keys::{Keyring, MasterKey},
    model::{Fields, RecordId, TenantName},
    records::Records,
    sample::sample_fields,
    store::{SledOptions, Storage},
    tenants::Tenants,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn field_crypto(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Storage::open_sled(
        dir.path(),
        &SledOptions {
            cache_capacity_bytes: 1 << 24,
        },
    )
    .unwrap();
    let ring = rt
        .block_on(Keyring::open(
            store.clone(),
            coffre::keys::KeyHome::in_dir(dir.path()),
            &MasterKey::from_secret(SecretKey::random()),
            u64::MAX,
        ))
        .unwrap();
    ring.create_tenant_keys("bench").unwrap();
    let keys = rt.block_on(ring.tenant("bench")).unwrap().unwrap();
    let (active, _) = rt.block_on(ring.reserve_encryptions(&keys, 1)).unwrap();
    let mut g = c.benchmark_group("field");
    for size in [16usize, 256, 1024, 4096] {
        let value = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encrypt", size), &value, |b, v| {
            b.iter(|| {
                keys.encrypt_field(
                    &active,
                    "00000000-0000-4000-8000-000000000000",
                    "address",
                    black_box(v),
                )
            })
        });
        let sealed = keys.encrypt_field(
            &active,
            "00000000-0000-4000-8000-000000000000",
            "address",
            &value,
        );
        g.bench_with_input(BenchmarkId::new("decrypt", size), &sealed, |b, s| {
            b.iter(|| {
                keys.decrypt_field(
                    "00000000-0000-4000-8000-000000000000",
                    "address",
                    black_box(s),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn record_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Storage::open_sled(
        dir.path(),
        &SledOptions {
            cache_capacity_bytes: 1 << 26,
        },
    )
    .unwrap();
    let ring = Arc::new(
        rt.block_on(Keyring::open(
            store.clone(),
            coffre::keys::KeyHome::in_dir(dir.path()),
            &MasterKey::from_secret(SecretKey::random()),
            u64::MAX,
        ))
        .unwrap(),
    );
    let pepper = SecretKey::from_slice(ring.pepper().expose()).unwrap();
    let hasher = Hasher::new(
        &Argon2Config {
            m_kib: 64,
            t: 1,
            p: 1,
            max_concurrent: 1,
        },
        pepper,
    )
    .unwrap();
    let tenants = Tenants::new(store.clone(), ring.clone());
    let records = Records::new(store.clone(), ring.clone(), hasher);
    let name = TenantName::parse("bench").unwrap();
    rt.block_on(tenants.create(&name, &[coffre::model::FieldName::parse("nir").unwrap()]))
        .unwrap();
    let tenant = rt.block_on(tenants.get(&name)).unwrap();
    let id = RecordId::parse("bench-record").unwrap();
    let mut g = c.benchmark_group("record_10_fields");
    let mut i = 0u64;
    g.bench_function("put_durable", |b| {
        b.iter(|| {
            i += 1;
            let fields = Fields::parse(sample_fields(i)).unwrap();
            rt.block_on(records.put(&tenant, Some(id.clone()), fields))
                .unwrap()
        })
    });
    g.bench_function("get_all_fields", |b| {
        b.iter(|| {
            rt.block_on(records.get(&tenant, black_box(&id), &[]))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, field_crypto, record_store);
criterion_main!(benches);
