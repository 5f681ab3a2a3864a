pub mod ast;
pub mod expressions;
mod process;
mod symbol;
mod tokenizer;

use crate::{Error, Result};

use ast::*;
use symbol::Symbol;
use tokenizer::*;

#[derive(Debug)]
pub struct Parser<'a> {
    pub tokenizer: Tokenizer<'a>,
    pub token: Token,
}

impl<'a> Parser<'a> {
    fn new(source: &'a str) -> Result<Self> {
        let mut tokenizer = Tokenizer::new(source);
        Ok(Self {
            token: tokenizer.next_token()?,
            tokenizer,
        })
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    pub fn next_token(&mut self) -> Result<()> {
        self.token = self.tokenizer.next_token()?;
        Ok(())
    }

    pub fn expect(&mut self, expected: TokenKind) -> Result<()> {
        if self.token.kind == TokenKind::End {
            return Err(Error::S0203ExpectedTokenBeforeEnd(
                self.token.byte_index,
                expected.to_string(),
            ));
        }

        if self.token.kind != expected {
            return Err(Error::S0202UnexpectedToken(
                self.token.char_index,
                expected.to_string(),
                self.token.kind.to_string(),
            ));
        }

        self.next_token()?;

        Ok(())
    }

    pub fn expression(&mut self, bp: u32) -> Result<Ast> {
        let mut last = self.token.clone();
        self.next_token()?;

        let mut left = last.null_denotation(self)?;

        while bp < self.token.left_binding_power() {
            last = self.token.clone();
            self.next_token()?;
            left = last.left_denotation(self, left)?;
        }

        Ok(left)
    }
}

pub fn parse(source: &str) -> Result<Ast> {
    let mut parser = Parser::new(source)?;
    let ast = parser.expression(0)?;
    if !matches!(parser.token().kind, TokenKind::End) {
        return Err(Error::S0201SyntaxError(
            parser.token().byte_index,
            parser.tokenizer.string_from_token(parser.token()),
        ));
    }
    ast.process()
}

#[cfg(test)]
mod tests {
    //! Parsing tests, mostly just to ensure that the parser doesn't fail on valid JSONata. Most
    //! of these examples are taken from the JSONata docs. These are not meant to be tests of the
    //! produced AST, which is proved correct by the integration tests.
    use super::*;
    #[test]
    fn parser_tests() {
        let cases: &[(&str, &str)] = &[

        ("Address1.City", "basic path"),
        ("Other.`Over 18 ?`", "backtick path"),
        ("Phone1[0]", "array index"),
        ("Phone2[-1]", "negative array index"),
        ("Phone3[0].Number", "index and path"),
        ("Phone4[[0..1]]", "range"),
        ("$[0]", "context index"),
        ("$[0].ref", "context index and path"),
        ("$[0].ref[0]", "context index and path index"),
        ("$.ref", "context path"),
        ("Phone5[type='mobile']", "predicate"),
        ("Phone6[type='mobile'].number", "predicate and path"),
        ("Address2.*", "suffix wildcard"),
        ("*.Postcode1", "prefix wildcard"),
        ("**.Postcode2", "prefix descendent wildcard"),
        ("FirstName & ' ' & Surname", "string concatenation"),
        ("Address3.(Street & ', ' & City)", "grouped string concatenation"),
        ("5&0&true", "mixed type string concatenation"),
        ("Numbers1[0] + Numbers[1]", "addition"),
        ("Numbers2[0] - Numbers[1]", "subtraction"),
        ("Numbers3[0] * Numbers[1]", "multiplication"),
        ("Numbers4[0] / Numbers[1]", "division"),
        ("Numbers5[0] % Numbers[1]", "modulus"),
        ("Numbers6[0] = Numbers[5]", "equal"),
        ("Numbers7[0] != Numbers[5]", "not equqal"),
        ("Numbers8[0] < Numbers[5]", "less than"),
        ("Numbers9[0] <= Numbers[5]", "less than equal"),
        ("Numbers10[0] > Numbers[5]", "greater than"),
        ("Numbers11[0] >= Numbers[5]", "greater than equal"),
        ("\"01962 001234\" in Phone.number", "string constant, in operator"),
        ("(Numbers12[2] != 0) and (Numbers[5] != Numbers[1])", "boolean and"),
        ("(Numbers13[2] != 0) or (Numbers[5] = Numbers[1])", "boolean or"),
        ("Email1.[address]", "array constructor"),
        ("[Address4, Other.`Alternative.Address`].City", "array constructor 2"),
        ("Phone7.{type: number}", "object constructor"),
        ("Phone8{type: number}", "object constructor 2"),
        ("Phone9{type: number[]}", "object constructor 3"),
        ("(5 + 3) * 4", "math"),
        ("(expr1; expr2; expr3)", "block expression"),
        ("Account2.Order.Product^(Price)", "sort 1"),
        ("Account3.Order.Product^(>Price)", "sort 2"),
        ("Account4.Order.Product^(>Price, <Quantity)", "sort 3"),
        ("Account5.Order.Product^(Price * Quantity)", "sort 4"),
        ("student[type='fulltime']^(DoB).name", "sort 5"),
        ("/[0-9]+/", "regex literal"),
        (
            r#"
            Invoice.(
              $p := Product.Price;
              $q := Product.Quantity;
              $p * $q
            )
        "#, "variable assignment"
        ),
        (
            r#"
            (
              $volume := function($l, $w, $h){ $l * $w * $h };
              $volume(10, 10, 5);
            )
        "#, "function definition"
        ),
        (
            r#"
            (
              $factorial:= function($x){ $x <= 1 ? 1 : $x * $factorial($x-1) };
              $factorial(4)
            )
        "#, "function definition 1"
        ),
        (
            r#"
            (
              $factorial := function($x){(
                $iter := function($x, $acc) {
                  $x <= 1 ? $acc : $iter($x - 1, $x * $acc)
                };
                $iter($x, 1)
              )};
              $factorial(170)
            )
        "#, "function definition 2"
        ),
        (
            r#"
            (
              $twice := function($f) { function($x){ $f($f($x)) } };
              $add3 := function($y){ $y + 3 };
              $add6 := $twice($add3);
              $add6(7)
            )
        "#, "function definition 3"
        ),
        (
            r#"
            Account.(
              $AccName := function() { $.'Account Name' };

              Order[OrderID = 'order104'].Product.{
                'Account': $AccName(),
                'SKU-' & $string(ProductID): $.'Product Name'
              }
            )
        "#, "function definition 4"
        ),
        (
            r#"
            (
              $firstN := $substring(?, 0, ?);
              $first5 := $firstN(?, 5);
              $first5("Hello, World")
            )
        "#, "functions"
        ),
        (
            "Customer.Email ~> $substringAfter(\"@\") ~> $substringBefore(\".\") ~> $uppercase()", "function application"
        ),
        // (
        //     r#"
        //     Account.Order.Product.{
        //       'Product': `Product Name`,
        //       'Order': %.OrderID,
        //       'Account': %.%.`Account Name`
        //     }
        // "#, "parent operator"
        // ),
        // (
        //     r#"
        //     library.books#$i['Kernighan' in authors].{
        //       'title': title,
        //       'index': $i
        //     }
        // "#, "context variables 1"
        // ),
        // (
        //     r#"
        //     library.loans@$l.books@$b[$l.isbn=$b.isbn].{
        //       'title': $b.title,
        //       'customer': $l.customer
        //     }
        // "#, "context variables 2"
        // ),
        // (
        //     r#"
        //     (library.loans)@$l.(catalog.books)@$b[$l.isbn=$b.isbn].{
        //       'title': $b.title,
        //       'customer': $l.customer
        //     }
        // "#, "context variables 3"
        // ),
        ("payload ~> |Account.Order.Product|{'Price': Price * 1.2}|", "object transform 1"),
        ("$ ~> |Account.Order.Product|{'Total': Price * Quantity}, ['Price', 'Quantity']|", "object transform 2"),
        (
            r#"
            /* Long-winded expressions might need some explanation */
            (
              $pi := 3.1415926535897932384626;
              /* JSONata is not known for its graphics support! */
              $plot := function($x) {(
                $floor := $string ~> $substringBefore(?, '.') ~> $number;
                $index := $floor(($x + 1) * 20 + 0.5);
                $join([0..$index].('.')) & 'O' & $join([$index..40].('.'))
              )};

              /* Factorial is the product of the integers 1..n */
              $product := function($a, $b) { $a * $b };
              $factorial := function($n) { $n = 0 ? 1 : $reduce([1..$n], $product) };

              $sin := function($x){ /* define sine in terms of cosine */
                $cos($x - $pi/2)
              };
              $cos := function($x){ /* Derive cosine by expanding Maclaurin series */
                $x > $pi ? $cos($x - 2 * $pi) : $x < -$pi ? $cos($x + 2 * $pi) :
                  $sum([0..12].($power(-1, $) * $power($x, 2*$) / $factorial(2*$)))
              };

              [0..24].$sin($*$pi/12).$plot($)
            )
        "#, "complex expression"
        ),
        ];
        for (source, name) in cases {
            if let Err(e) = parse(source) {
                panic!("{name}: failed to parse: {e}");
            }
        }
    }
}
