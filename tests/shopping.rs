//! Shopping providers: Naver against a wiremock server answering in Naver's own JSON shapes,
//! and the sample catalog.

use std::time::{Duration, Instant};

use deskgen::shopping::{
    self, CatalogProvider, NaverProvider, ProviderChoice, ShoppingConfig, ShoppingError, ShoppingProvider,
};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SEARCH_PATH: &str = "/v1/search/shop.json";

fn config(server: &MockServer) -> ShoppingConfig {
    ShoppingConfig {
        provider: ProviderChoice::Naver,
        naver_client_id: Some("test-client-id".into()),
        naver_client_secret: Some("test-client-secret".parse().unwrap()),
        naver_base_url: server.uri(),
        naver_qps: 1000.0,
        naver_attempts: 3,
        naver_retry_backoff: Duration::from_millis(5),
        naver_timeout: Duration::from_millis(300),
        ..ShoppingConfig::default()
    }
}

fn item(title: &str, lprice: &str, mall: &str, product_id: &str, product_type: &str) -> Value {
    json!({
        "title": title,
        "link": format!("https://smartstore.naver.com/main/products/{product_id}"),
        "image": format!("https://shopping-phinf.pstatic.net/main_{product_id}/{product_id}.jpg"),
        "lprice": lprice,
        "hprice": "",
        "mallName": mall,
        "productId": product_id,
        "productType": product_type,
        "brand": "",
        "maker": "",
        "category1": "디지털/가전",
        "category2": "PC주변기기",
        "category3": "마우스",
        "category4": "무선마우스"
    })
}

/// A search response in Naver's shape.
fn naver_body(items: Vec<Value>) -> Value {
    json!({
        "lastBuildDate": "Thu, 26 Nov 2026 15:00:00 +0900",
        "total": 184523,
        "start": 1,
        "display": items.len(),
        "items": items
    })
}

fn mouse_results() -> Value {
    naver_body(vec![
        item("<b>로지텍</b> M650 &amp; 무선 <b>마우스</b> &quot;그래파이트&quot;", "39000", "", "1001", "1"),
        item("앱코 A660 무선 저소음 <b>마우스</b>", "12900", "앱코몰", "1002", "2"),
        item("앱코 A660 무선 저소음 마우스 (재고)", "13500", "다른몰", "1002", "2"),
        item("무선 마우스 중고 A급", "5000", "중고나라", "1003", "4"),
        item("<b>마우스</b> 패드 소형", "1000", "문구몰", "1004", "1"),
        item("로지텍 M331 SILENT PLUS", "19900", "로지텍 공식스토어", "1005", "3"),
        item("마이크로소프트 모던 모바일 마우스", "25000", "", "1006", "1"),
    ])
}

#[tokio::test]
async fn maps_naver_items_to_offers_cheapest_relevant_first() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(SEARCH_PATH))
        .and(query_param("query", "무선 마우스"))
        .and(query_param("display", "40"))
        .and(query_param("start", "1"))
        .and(query_param("sort", "sim"))
        .and(query_param("exclude", "used:rental:cbshop"))
        .and(header("X-Naver-Client-Id", "test-client-id"))
        .and(header("X-Naver-Client-Secret", "test-client-secret"))
        .respond_with(ResponseTemplate::new(200).set_body_json(mouse_results()))
        .expect(1)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    let offers = naver.search("무선 마우스", 10).await.unwrap();

    let summary: Vec<(&str, &str, &str)> =
        offers.iter().map(|o| (o.title.as_str(), o.price.as_str(), o.mall.as_str())).collect();
    assert_eq!(
        summary,
        [
            // Cheapest copy of product 1002 only; the used item and the mouse pad are gone.
            ("앱코 A660 무선 저소음 마우스", "12900원", "앱코몰"),
            ("로지텍 M331 SILENT PLUS", "19900원", "로지텍 공식스토어"),
            ("마이크로소프트 모던 모바일 마우스", "25000원", "네이버"),
            ("로지텍 M650 & 무선 마우스 \"그래파이트\"", "39000원", "네이버"),
        ]
    );
    let first = &offers[0];
    assert_eq!(first.price_won, 12900);
    assert_eq!(first.category3, "마우스");
    assert_eq!(first.category4, "무선마우스");
    assert_eq!(first.link, "https://smartstore.naver.com/main/products/1002");
    assert_eq!(first.image, "https://shopping-phinf.pstatic.net/main_1002/1002.jpg");
    assert!(naver.healthy());
}

#[tokio::test]
async fn repeated_queries_are_served_from_cache() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(mouse_results()))
        .expect(1)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    assert_eq!(naver.search("무선 마우스", 3).await.unwrap().len(), 3);
    let cached = naver.search("  무선   마우스 ", 2).await.unwrap();
    assert_eq!(cached.len(), 2);
    assert_eq!(cached[0].price, "12900원");
}

#[tokio::test]
async fn rate_limit_serves_the_cache_and_pauses_requests() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(mouse_results()))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "30").set_body_json(
            json!({"errorMessage": "Rate limit exceeded. (속도 제한을 초과했습니다.)", "errorCode": "012"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    // A zero TTL makes every search go to Naver, unless Naver asked us to wait.
    let naver =
        NaverProvider::new(&ShoppingConfig { naver_cache_ttl: Duration::ZERO, ..config(&server) }).unwrap();
    let fresh = naver.search("무선 마우스", 5).await.unwrap();
    let stale = naver.search("무선 마우스", 5).await.unwrap();
    assert_eq!(stale, fresh);
    // Paused by Retry-After: answered from the cache without calling Naver.
    assert_eq!(naver.search("무선 마우스", 5).await.unwrap(), fresh);
    let error = naver.search("기계식 키보드", 5).await.unwrap_err();
    assert!(matches!(error, ShoppingError::RateLimited { .. }), "{error}");
}

#[tokio::test]
async fn server_errors_are_retried() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"errorMessage": "System error.", "errorCode": "SE99"})),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(mouse_results()))
        .expect(1)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    assert_eq!(naver.search("무선 마우스", 10).await.unwrap().len(), 4);
}

#[tokio::test]
async fn persistent_server_errors_fail_after_every_attempt() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(
            ResponseTemplate::new(503)
                .set_body_json(json!({"errorMessage": "System error.", "errorCode": "SE99"})),
        )
        .expect(3)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    let error = naver.search("무선 마우스", 10).await.unwrap_err();
    assert!(
        matches!(error, ShoppingError::Upstream { status: 503, ref code, .. } if code == "SE99"),
        "{error}"
    );
}

#[tokio::test]
async fn timeouts_are_retried_then_reported() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(mouse_results()).set_delay(Duration::from_secs(2)),
        )
        .expect(2)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&ShoppingConfig {
        naver_attempts: 2,
        naver_timeout: Duration::from_millis(100),
        ..config(&server)
    })
    .unwrap();
    let error = naver.search("무선 마우스", 10).await.unwrap_err();
    assert!(matches!(error, ShoppingError::Timeout { attempts: 2 }), "{error}");
}

#[tokio::test]
async fn malformed_json_is_an_error_without_retry() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_raw("{\"items\": [{\"title\": ", "application/json"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    let error = naver.search("무선 마우스", 10).await.unwrap_err();
    assert!(matches!(error, ShoppingError::Malformed(_)), "{error}");
}

#[tokio::test]
async fn client_errors_carry_naver_error_codes() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"errorMessage": "Incorrect query request. (잘못된 쿼리요청입니다.)", "errorCode": "SE01"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    let error = naver.search("무선 마우스", 10).await.unwrap_err();
    assert!(
        matches!(error, ShoppingError::Upstream { status: 400, ref code, .. } if code == "SE01"),
        "{error}"
    );
}

#[tokio::test]
async fn rejected_keys_mark_the_provider_unhealthy() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"errorMessage": "Authentication failed. (인증에 실패했습니다.)", "errorCode": "024"}),
        ))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(mouse_results()))
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&config(&server)).unwrap();
    for _ in 0..2 {
        let error = naver.search("무선 마우스", 10).await.unwrap_err();
        assert!(
            matches!(error, ShoppingError::Unauthorized { status: 401, ref code, .. } if code == "024"),
            "{error}"
        );
        assert!(!naver.healthy());
    }
    naver.search("무선 마우스", 10).await.unwrap();
    assert!(naver.healthy());
}

#[tokio::test]
async fn requests_are_spaced_by_the_qps_limit() {
    let server = MockServer::start().await;
    Mock::given(path(SEARCH_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(naver_body(Vec::new())))
        .expect(3)
        .mount(&server)
        .await;
    let naver = NaverProvider::new(&ShoppingConfig { naver_qps: 20.0, ..config(&server) }).unwrap();
    let started = Instant::now();
    for query in ["무선 마우스", "기계식 키보드", "27인치 모니터"] {
        assert!(naver.search(query, 3).await.unwrap().is_empty());
    }
    assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
}

/// The Naver query of every starter category.
const CATEGORY_QUERIES: [&str; 11] = [
    "무선 마우스",
    "기계식 키보드",
    "27인치 모니터",
    "노트북 거치대",
    "LED 스탠드",
    "모니터 조명",
    "데스크 매트",
    "컴퓨터 스피커",
    "미니 화분",
    "머그컵",
    "사무용 의자",
];

#[tokio::test]
async fn sample_catalog_covers_every_category() {
    let catalog = CatalogProvider::sample();
    assert!(catalog.is_sample_data());
    for query in CATEGORY_QUERIES {
        let offers = catalog.search(query, 3).await.unwrap();
        assert_eq!(offers.len(), 3, "{query}");
        assert!(offers.windows(2).all(|pair| pair[0].price_won <= pair[1].price_won), "{query}");
        for offer in &offers {
            assert!(offer.price.ends_with('원') && offer.price_won > 0, "{offer:?}");
            assert!(!offer.mall.is_empty() && !offer.category3.is_empty(), "{offer:?}");
            assert!(
                offer.link.starts_with("https://search.shopping.naver.com/search/all?query="),
                "{offer:?}"
            );
        }
    }
    assert!(catalog.search("무선마우스", 1).await.unwrap().len() == 1);
    assert!(catalog.search("양자 컴퓨터", 3).await.unwrap().is_empty());
}

#[tokio::test]
async fn build_picks_naver_only_with_keys() {
    let without_keys = shopping::build(&ShoppingConfig::default()).unwrap();
    assert_eq!(without_keys.name(), "catalog");
    let server = MockServer::start().await;
    let with_keys =
        shopping::build(&ShoppingConfig { provider: ProviderChoice::Auto, ..config(&server) }).unwrap();
    assert_eq!(with_keys.name(), "naver");
    let error =
        shopping::build(&ShoppingConfig { provider: ProviderChoice::Naver, ..ShoppingConfig::default() })
            .err()
            .unwrap();
    assert!(matches!(error, ShoppingError::Config(_)), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("catalog.json");
    std::fs::write(&file, r#"{"queries": {"머그컵": [{"title": "머그", "price": 5000, "category3": "컵", "link": "https://example.com/mug"}]}}"#).unwrap();
    let own = shopping::build(&ShoppingConfig { catalog: Some(file), ..ShoppingConfig::default() }).unwrap();
    let offers = own.search("머그컵", 3).await.unwrap();
    assert_eq!((offers[0].price.as_str(), offers[0].mall.as_str()), ("5000원", "네이버"));
}
